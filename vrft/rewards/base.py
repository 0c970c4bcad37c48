"""The reward interface the trainer calls, and how it names rewards in logs."""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from vrft.rewards.parsing import MAX_SOLUTION_CHARS, completion_text

RewardFn = Callable[..., list[float]]


class Reward(ABC):
    """A verifiable reward: one float per completion, computed from the text alone.

    Called as ``reward(completions, solutions, **columns)`` where ``completions[i]`` is generated
    text (or TRL-style chat messages) and ``solutions[i]`` the ground truth wrapped in
    ``<answer>...</answer>``. Extra dataset columns (``problem``, ``image``, ...) arrive as keyword
    lists and are ignored. Subclasses implement ``score`` for one pair; it must not raise on any
    string, and its value is clipped into ``[low, high]`` with non-finite values read as ``low``.
    A solution longer than ``MAX_SOLUTION_CHARS`` (which the data checks refuse) scores ``low``
    without being parsed, so that no input makes a reward call slow.
    """

    name: str = "reward"  # shown in logs, e.g. "rewards/accuracy"
    low: float = 0.0
    high: float = 1.0
    uses_solution: bool = True  # False: the score ignores the solution, so its size does not matter

    def __call__(self, completions: Sequence[Any], solutions: Sequence[str], **columns: Any) -> list[float]:
        if len(completions) != len(solutions):
            raise ValueError(
                f"reward '{self.name}' got {len(completions)} completions but {len(solutions)} solutions; "
                "repeat each solution once per sampled completion (group_size times)"
            )
        texts = [completion_text(completion) for completion in completions]
        truths = [str(solution) for solution in solutions]
        kept = [
            i for i, truth in enumerate(truths) if not self.uses_solution or len(truth) <= MAX_SOLUTION_CHARS
        ]
        values = [self.low] * len(texts)
        for index, value in zip(
            kept, self.score_batch([texts[i] for i in kept], [truths[i] for i in kept]), strict=True
        ):
            values[index] = self._bounded(value)
        return values

    def score_batch(self, completions: list[str], solutions: list[str]) -> list[float]:
        """Score a batch of texts; by default ``score`` on each pair (override to use the whole batch)."""
        return [
            self.score(completion, solution)
            for completion, solution in zip(completions, solutions, strict=True)
        ]

    @abstractmethod
    def score(self, completion: str, solution: str) -> float:
        """Score one completion text against one solution string."""

    def _bounded(self, value: float) -> float:
        # Last line of defence: a NaN reward would poison the group's advantage normalisation.
        return min(self.high, max(self.low, value)) if math.isfinite(value) else self.low

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


def reward_name(fn: RewardFn) -> str:
    """Name under which the trainer logs a reward: its ``name``, else its ``__name__``.

    Works for ``Reward`` objects, plain functions and ``functools.partial`` of either.
    """
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return getattr(fn, "__name__", type(fn).__name__)
