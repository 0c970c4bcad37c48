"""Reasoning-grounding (LISA) reward: GIoU + 1 of the first predicted box against the target box."""

from __future__ import annotations

from vrft.rewards.base import Reward
from vrft.rewards.boxes import box_area, box_giou, box_iou, clamp_box
from vrft.rewards.parsing import check_solution_size, extract_answer, parse_grounding_box, read_answer


class GroundingReward(Reward):
    """``GIoU(first predicted box, ground-truth box) + 1``, in [0, 2]; 0.0 when nothing parses.

    Boxes are read as ``(x1,y1),(x2,y2)`` or ``[x1, y1, x2, y2]`` from the ``<answer>`` block of
    both completion and solution; corners given in the wrong order are swapped.

    GIoU + 1 is 1 for a box that only touches the target's enclosing box, so the paper's reward pays a
    constant whole-image box at least ~1.05 of 2 on every image. ``strict`` closes that.

    Args:
        compat: read a completion without ``<answer>`` as a whole, as the reference does. By
            default the box must follow ``<answer>`` (a cut-off ``</answer>`` is tolerated).
        coord_max: clamp predicted coordinates into ``[0, coord_max]``; None leaves them as written.
        strict: pay ``GIoU + 1`` only when the box's IoU with the target exceeds ``iou_threshold``,
            else 0. Default False: the paper's reward.
        iou_threshold: the IoU a box must exceed to be paid under ``strict`` (0.5, the detection match).
    """

    name = "grounding"
    high = 2.0

    def __init__(
        self,
        compat: bool = False,
        coord_max: float | None = None,
        strict: bool = False,
        iou_threshold: float = 0.5,
    ) -> None:
        self.compat = compat
        self.coord_max = coord_max
        self.strict = strict
        self.iou_threshold = iou_threshold

    def score(self, completion: str, solution: str) -> float:
        truth_text = extract_answer(solution, allow_unclosed=True)
        truth = parse_grounding_box(truth_text, None) if truth_text is not None else None
        answer = read_answer(completion, self.compat, allow_unclosed=True)
        predicted = parse_grounding_box(answer) if answer is not None else None
        if truth is None or predicted is None:
            return 0.0
        if self.coord_max is not None:
            predicted = clamp_box(predicted, self.coord_max)
        if self.strict and box_iou(predicted, truth) <= self.iou_threshold:
            return 0.0
        return box_giou(predicted, truth) + 1.0


grounding_reward = GroundingReward()


def check_grounding_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is ``<answer>(x1,y1),(x2,y2)</answer>`` with positive area."""
    check_solution_size(solution)
    answer = extract_answer(solution) if isinstance(solution, str) else None
    if answer is None:
        raise ValueError(
            f"solution {solution!r} has no <answer>...</answer>; wrap the target box as <answer>(x1,y1),(x2,y2)</answer>"
        )
    box = parse_grounding_box(answer, None)
    if box is None:
        raise ValueError(f"solution {solution!r} has no box; write it as <answer>(x1,y1),(x2,y2)</answer>")
    if box_area(box) <= 0:
        raise ValueError(f"box {list(box)} in solution {solution!r} has zero area; fix its corners")
