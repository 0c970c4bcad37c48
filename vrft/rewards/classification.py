"""Classification accuracy reward: does the answer name the ground-truth class?"""

from __future__ import annotations

from vrft.rewards.base import Reward
from vrft.rewards.parsing import extract_answer, read_answer


def normalize_label(text: str) -> str:
    """Matching key of the reference: strip, drop spaces and underscores, lowercase."""
    return text.strip().replace(" ", "").replace("_", "").lower()


def labels_match(predicted: str, truth: str) -> bool:
    """The reference rule on normalised labels: one contains the other."""
    return truth in predicted or predicted in truth


class AccuracyReward(Reward):
    """1.0 when the ``<answer>`` of the completion and of the solution match, else 0.0.

    Both answers are normalised with ``normalize_label`` and match when one contains the other
    ("Pink_Primrose" matches "a pink primrose").

    Args:
        compat: reproduce the reference exactly: a completion without a one-line
            ``<answer>...</answer>`` is read whole, and an empty answer "contains" nothing and so
            scores 1.0 (a loophole a policy can learn). By default (False) the answer must sit in
            ``<answer>...</answer>`` (it may span lines) and an empty or missing answer scores 0.0.
    """

    name = "accuracy"

    def __init__(self, compat: bool = False) -> None:
        self.compat = compat

    def score(self, completion: str, solution: str) -> float:
        predicted = read_answer(completion, self.compat)
        truth = read_answer(solution, self.compat)
        if predicted is None or truth is None:
            return 0.0
        predicted, truth = normalize_label(predicted), normalize_label(truth)
        if not self.compat and not (predicted and truth):
            return 0.0
        return 1.0 if labels_match(predicted, truth) else 0.0


accuracy_reward = AccuracyReward()


def check_classification_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is ``<answer>label</answer>`` with a non-empty label."""
    answer = extract_answer(solution) if isinstance(solution, str) else None
    if answer is None:
        raise ValueError(
            f"solution {solution!r} has no <answer>...</answer>; wrap the ground truth as <answer>label</answer>"
        )
    if not normalize_label(answer):
        raise ValueError(
            f"solution {solution!r} has an empty label; every row needs a class name inside <answer>...</answer>"
        )
