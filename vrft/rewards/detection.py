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
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from vrft.rewards.base import Reward
from vrft.rewards.boxes import box_area, box_iou, clamp_box
from vrft.rewards.parsing import Detection, extract_answer, parse_detection_answer, read_answer


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


def match_detections(
    predictions: list[Detection], ground_truth: list[Detection], iou_threshold: float = 0.5
) -> list[MatchedPrediction]:
    """Greedy matching in order of decreasing confidence; returns one result per prediction."""
    free = list(range(len(ground_truth)))
    results = []
    for prediction in sorted(predictions, key=lambda detection: detection.confidence, reverse=True):
        best_iou, best_index = 0.0, -1
        for index in free:
            iou = box_iou(prediction.box, ground_truth[index].box)
            if iou > best_iou:  # strict: ties go to the first ground-truth box, as in the reference
                best_iou, best_index = iou, index
        matched = best_iou > iou_threshold
        if matched:
            free.remove(best_index)
        results.append(MatchedPrediction(best_iou if matched else 0.0, prediction.confidence, matched))
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
    predictions it is 1.0 when the ground truth is empty too, else 0.0. Options as in ``DetectionReward``.
    """

    name = "confidence"

    def combine(self, matches: list[MatchedPrediction], num_ground_truth: int) -> float:
        if not matches:
            return 1.0 if num_ground_truth == 0 else 0.0
        total = sum(match.confidence if match.matched else 1.0 - match.confidence for match in matches)
        return min(1.0, max(0.0, total / len(matches)))


iou_reward = IoUReward()
confidence_reward = ConfidenceReward()


def check_detection_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is a complete detection answer with non-empty boxes.

    Valid: ``<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>`` or
    ``<answer>No Objects</answer>``.
    """
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
    for detection in detections:
        if box_area(detection.box) <= 0:
            raise ValueError(
                f"box {list(detection.box)} in solution {solution!r} has zero area; drop it or fix its corners"
            )
