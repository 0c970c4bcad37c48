"""Detection rewards of Visual-RFT: IoU reward and confidence reward.

Both read an answer like ``[{'Position': [x1, y1, x2, y2], 'Confidence': 0.93}, ...]`` (or
"No Objects") from the completion and the solution, then match predictions to ground truth:

1. exact duplicate boxes are dropped (first kept; a duplicate is the same box, whatever its
   confidence, as in the reference);
2. predictions are sorted by confidence, highest first (stable, so ties keep answer order);
3. each prediction takes the still-unmatched ground-truth box of highest IoU; the match counts only
   when that IoU is above ``iou_threshold`` (0.5).

Cases with an empty side ("No Objects" or ``[]``), where the reference crashes or scores 0:

=====================  ==================  ====================================
ground truth           prediction          IoU reward / confidence reward
=====================  ==================  ====================================
empty                  empty               1 / 1 (the right answer)
empty                  boxes               0 / mean(1 - c) (all false positives)
boxes                  empty               0 / 0
any                    unreadable          0 / 0
=====================  ==================  ====================================

The paper's confidence reward pays ``1 - c`` for a box that matches nothing, so one constant
zero-confidence box earns the full confidence reward on every image (2.0 of 3.0 with the format
reward). ``ConfidenceReward(strict=True)`` (``task.strict=true``) pays nothing for such a box; the
default stays the paper's so that results compare.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from vrft.rewards.base import Reward
from vrft.rewards.boxes import box_area, clamp_box
from vrft.rewards.parsing import (
    MAX_SOLUTION_BOXES,
    Detection,
    check_solution_size,
    extract_answer,
    parse_detection_answer,
    read_answer,
)


@dataclass(frozen=True)
class MatchedPrediction:
    """Outcome of greedy matching for one prediction."""

    iou: float  # IoU with the matched ground-truth box; 0.0 when unmatched
    confidence: float  # the prediction's confidence, in [0, 1]
    matched: bool  # IoU with its best free ground-truth box was above the threshold


def remove_duplicate_boxes(detections: list[Detection]) -> list[Detection]:
    """Drop detections whose box already appeared earlier in the list."""
    seen: set[tuple[float, ...]] = set()
    unique = []
    for detection in detections:
        if detection.box not in seen:
            seen.add(detection.box)
            unique.append(detection)
    return unique


def iou_matrix(predictions: list[Detection], ground_truth: list[Detection]) -> np.ndarray:
    """IoU of every prediction with every ground-truth box, ``[P, G]`` float64.

    The same arithmetic as ``box_iou`` in the same order (so the same values), vectorised: a Python
    loop over 100 predictions x 300 ground-truth boxes takes tens of milliseconds per reward call.
    """
    boxes_p = np.array([d.box for d in predictions], dtype=np.float64).reshape(-1, 1, 4)  # [P, 1, 4]
    boxes_g = np.array([d.box for d in ground_truth], dtype=np.float64).reshape(1, -1, 4)  # [1, G, 4]
    with np.errstate(all="ignore"):  # overflowing areas read as IoU 0, as in box_iou
        width = np.minimum(boxes_p[..., 2], boxes_g[..., 2]) - np.maximum(boxes_p[..., 0], boxes_g[..., 0])
        height = np.minimum(boxes_p[..., 3], boxes_g[..., 3]) - np.maximum(boxes_p[..., 1], boxes_g[..., 1])
        intersection = np.where((width > 0) & (height > 0), width * height, 0.0)
        area_p = np.maximum(0.0, boxes_p[..., 2] - boxes_p[..., 0]) * np.maximum(
            0.0, boxes_p[..., 3] - boxes_p[..., 1]
        )
        area_g = np.maximum(0.0, boxes_g[..., 2] - boxes_g[..., 0]) * np.maximum(
            0.0, boxes_g[..., 3] - boxes_g[..., 1]
        )
        union = area_p + area_g - intersection
        iou = np.where(union > 0, intersection / union, 0.0)
    return np.where(np.isfinite(iou), iou, 0.0)


def match_detections(
    predictions: list[Detection], ground_truth: list[Detection], iou_threshold: float = 0.5
) -> list[MatchedPrediction]:
    """Greedy matching in order of decreasing confidence; returns one result per prediction."""
    order = sorted(range(len(predictions)), key=lambda i: predictions[i].confidence, reverse=True)
    ious = iou_matrix(predictions, ground_truth)  # a taken ground-truth box's column becomes -1
    results = []
    for index in order:
        # argmax takes the first of equal maxima: ties go to the first ground-truth box, as in the reference.
        best = int(ious[index].argmax()) if len(ground_truth) else -1
        best_iou = max(0.0, float(ious[index, best])) if best >= 0 else 0.0
        matched = best_iou > iou_threshold
        if matched:
            ious[:, best] = -1.0
        results.append(
            MatchedPrediction(best_iou if matched else 0.0, predictions[index].confidence, matched)
        )
    return results


class DetectionReward(Reward):
    """Base of the detection rewards: reads both answers, matches, and lets ``combine`` score in [0, 1].

    Args:
        compat: read a completion without ``<answer>`` as a whole, as the reference does. By
            default the answer must follow ``<answer>``; a missing ``</answer>`` (cut-off
            generation) is tolerated so that the complete entries of the list still count.
        coord_max: clamp predicted coordinates into ``[0, coord_max]`` (1000 for Qwen2-VL); None
            leaves them as written, which suits any coordinate convention.
        iou_threshold: IoU a match must exceed.
    """

    def __init__(
        self, compat: bool = False, coord_max: float | None = None, iou_threshold: float = 0.5
    ) -> None:
        self.compat = compat
        self.coord_max = coord_max
        self.iou_threshold = iou_threshold

    def score(self, completion: str, solution: str) -> float:
        truth_text = extract_answer(solution, allow_unclosed=True)
        ground_truth = parse_detection_answer(truth_text, None, None) if truth_text is not None else None
        answer = read_answer(completion, self.compat, allow_unclosed=True)
        predictions = parse_detection_answer(answer) if answer is not None else None
        if ground_truth is None or predictions is None:
            return 0.0
        if self.coord_max is not None:
            predictions = [Detection(clamp_box(p.box, self.coord_max), p.confidence) for p in predictions]
        predictions = remove_duplicate_boxes(predictions)
        return self.combine(
            match_detections(predictions, ground_truth, self.iou_threshold), len(ground_truth)
        )

    @abstractmethod
    def combine(self, matches: list[MatchedPrediction], num_ground_truth: int) -> float:
        """Reward in [0, 1] from the matches of the predictions (in confidence order)."""


class IoUReward(DetectionReward):
    """``sum(matched IoU) / max(N_gt, N_pred)``, capped at 1; 1.0 for "No Objects" vs "No Objects".

    Extra boxes dilute the reward through the denominator, missed boxes through the missing IoU.
    Options (``compat``, ``coord_max``, ``iou_threshold``) as in ``DetectionReward``.
    """

    name = "iou"

    def combine(self, matches: list[MatchedPrediction], num_ground_truth: int) -> float:
        if not matches and num_ground_truth == 0:
            return 1.0
        return min(1.0, sum(match.iou for match in matches) / max(num_ground_truth, len(matches)))


class ConfidenceReward(DetectionReward):
    """Mean over predictions of ``c`` if matched else ``1 - c``, clipped to [0, 1].

    Rewards calibrated confidences: high on true positives, low on false positives. With no
    predictions it is 1.0 when the ground truth is empty too, else 0.0.

    Args:
        strict: a box that matches nothing earns 0 instead of ``1 - c``, so the mean is
            ``sum(c over matched) / N_pred``: confidence is paid only on boxes that found an object,
            and a constant zero-confidence box no longer earns the full reward. Default False: the paper's.
        compat / coord_max / iou_threshold: as in ``DetectionReward``.
    """

    name = "confidence"

    def __init__(
        self,
        compat: bool = False,
        coord_max: float | None = None,
        iou_threshold: float = 0.5,
        strict: bool = False,
    ) -> None:
        super().__init__(compat, coord_max, iou_threshold)
        self.strict = strict

    def combine(self, matches: list[MatchedPrediction], num_ground_truth: int) -> float:
        if not matches:
            return 1.0 if num_ground_truth == 0 else 0.0
        total = sum(self._pay(match) for match in matches)
        return min(1.0, max(0.0, total / len(matches)))

    def _pay(self, match: MatchedPrediction) -> float:
        if match.matched:
            return match.confidence
        return 0.0 if self.strict else 1.0 - match.confidence


iou_reward = IoUReward()
confidence_reward = ConfidenceReward()


def check_detection_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is a complete detection answer with non-empty boxes.

    Valid: ``<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>`` or
    ``<answer>No Objects</answer>``.
    """
    check_solution_size(solution)
    answer = extract_answer(solution) if isinstance(solution, str) else None
    if answer is None:
        raise ValueError(
            f"solution {solution!r} has no <answer>...</answer>; wrap the ground truth as "
            "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}]</answer> or <answer>No Objects</answer>"
        )
    detections = parse_detection_answer(answer, None, None)
    if detections is None or (detections and not answer.rstrip().endswith("]")):
        raise ValueError(
            f"solution {solution!r} is not a complete detection list; write it as "
            "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer> or <answer>No Objects</answer>"
        )
    if len(detections) > MAX_SOLUTION_BOXES:
        raise ValueError(
            f"solution has {len(detections)} boxes, more than the {MAX_SOLUTION_BOXES} a ground-truth row may "
            "hold; split the row by category or drop it (data.on_bad_row=skip)"
        )
    for detection in detections:
        if box_area(detection.box) <= 0:
            raise ValueError(
                f"box {list(detection.box)} in solution {solution!r} has zero area; drop it or fix its corners"
            )
