"""Reasoning-grounding (LISA) reward: GIoU + 1 of the first predicted box against the target box."""

from __future__ import annotations

from vrft.rewards.base import Reward
from vrft.rewards.boxes import box_area, box_giou, clamp_box
from vrft.rewards.parsing import extract_answer, parse_grounding_box, read_answer


class GroundingReward(Reward):
    """``GIoU(first predicted box, ground-truth box) + 1``, in [0, 2]; 0.0 when nothing parses.

    Boxes are read as ``(x1,y1),(x2,y2)`` or ``[x1, y1, x2, y2]`` from the ``<answer>`` block of
    both completion and solution; corners given in the wrong order are swapped.

    Args:
        compat: read a completion without ``<answer>`` as a whole, as the reference does. By
            default the box must follow ``<answer>`` (a cut-off ``</answer>`` is tolerated).
        coord_max: clamp predicted coordinates into ``[0, coord_max]``; None leaves them as written.
    """

    name = "grounding"
    high = 2.0

    def __init__(self, compat: bool = False, coord_max: float | None = None) -> None:
        self.compat = compat
        self.coord_max = coord_max

    def score(self, completion: str, solution: str) -> float:
        truth_text = extract_answer(solution, allow_unclosed=True)
        truth = parse_grounding_box(truth_text, None) if truth_text is not None else None
        answer = read_answer(completion, self.compat, allow_unclosed=True)
        predicted = parse_grounding_box(answer) if answer is not None else None
        if truth is None or predicted is None:
            return 0.0
        if self.coord_max is not None:
            predicted = clamp_box(predicted, self.coord_max)
        return box_giou(predicted, truth) + 1.0


grounding_reward = GroundingReward()


def check_grounding_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is ``<answer>(x1,y1),(x2,y2)</answer>`` with positive area."""
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
