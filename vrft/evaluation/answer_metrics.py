"""Classification accuracy and grounding IoU: one score per answer against its solution, averaged.

Pure functions over answer text; no model code. Answers are read exactly as the rewards read them
(``compat`` chooses the reference's fallback to the whole completion). Detection mAP, which ranks the
answers' boxes across images rather than scoring each answer, is in `vrft.evaluation.mean_ap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.aggregation import MeanMetric

from vrft.rewards.boxes import Box, box_giou, box_iou
from vrft.rewards.classification import AccuracyReward
from vrft.rewards.parsing import extract_answer, parse_grounding_box, read_answer


def _mean(values: list[float]) -> float:
    # MeanMetric rather than a Python mean so that the same code can sync across ranks in a Lightning loop.
    metric = MeanMetric()
    metric.update(torch.tensor(values, dtype=torch.float64))
    return float(metric.compute())


def _check_pairs(completions: Sequence[str], solutions: Sequence[str]) -> None:
    if len(completions) != len(solutions) or not completions:
        raise ValueError(
            f"got {len(completions)} completions and {len(solutions)} solutions; pass one completion per "
            "solution, at least one"
        )


def classification_accuracy(
    completions: Sequence[str],
    solutions: Sequence[str],
    compat: bool = False,
    classes: Sequence[str] | None = None,
) -> float:
    """Fraction of completions whose answer matches the solution by the accuracy reward's rule, in [0, 1].

    The known classes are ``classes`` plus every label among ``solutions``: an answer naming two of
    them is wrong, as in the reward.
    """
    _check_pairs(completions, solutions)
    return _mean(AccuracyReward(compat=compat, classes=classes)(completions, solutions))


def _first_boxes(completion: str, solution: str, compat: bool) -> tuple[Box | None, Box | None]:
    truth_text = extract_answer(solution, allow_unclosed=True)
    truth = parse_grounding_box(truth_text, None) if truth_text is not None else None
    answer = read_answer(completion, compat, allow_unclosed=True)
    predicted: Box | None = parse_grounding_box(answer) if answer is not None else None
    return predicted, truth


def grounding_miou(completions: Sequence[str], solutions: Sequence[str], compat: bool = False) -> float:
    """Mean IoU of each completion's first box against its solution's box; unreadable answers count 0.

    Boxes are read as the grounding reward reads them (``(x1,y1),(x2,y2)`` or ``[x1, y1, x2, y2]``);
    both sides must use the same coordinate convention.
    """
    _check_pairs(completions, solutions)
    ious = []
    for completion, solution in zip(completions, solutions, strict=True):
        predicted, truth = _first_boxes(completion, solution, compat)
        ious.append(box_iou(predicted, truth) if predicted is not None and truth is not None else 0.0)
    return _mean(ious)


def grounding_giou(completions: Sequence[str], solutions: Sequence[str], compat: bool = False) -> float:
    """Mean generalised IoU (in [-1, 1], the grounding reward minus 1) of each first box; unreadable: -1.

    -1 for an unreadable answer is the GIoU of the worst box, as the reward scores it (0 = GIoU + 1).
    """
    _check_pairs(completions, solutions)
    gious = []
    for completion, solution in zip(completions, solutions, strict=True):
        predicted, truth = _first_boxes(completion, solution, compat)
        gious.append(box_giou(predicted, truth) if predicted is not None and truth is not None else -1.0)
    return _mean(gious)
