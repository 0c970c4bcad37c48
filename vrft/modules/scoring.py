"""Scoring stage of GRPO: verifiable rewards per completion, then group-normalised advantages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vrft.rewards.base import RewardFn


@dataclass
class WeightedReward:
    """A reward callable `fn(completions, solutions, **columns) -> list[float | None]` and its weight."""

    fn: RewardFn
    weight: float = 1.0


class RewardSet:
    """The named reward functions of a task; their weighted sum is the reward GRPO optimises.

    `None` from a reward means "no opinion" and counts as 0 in the sum (as TRL does); NaN or inf is a bug in
    the reward and raises, naming the reward and the completion.
    """

    def __init__(self, rewards: Mapping[str, WeightedReward | Mapping]):
        if not rewards:
            raise ValueError(
                "task.rewards is empty; a GRPO run needs at least one reward (e.g. format, accuracy)"
            )
        self.rewards = {
            name: r if isinstance(r, WeightedReward) else WeightedReward(**r) for name, r in rewards.items()
        }

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[str], columns: Mapping[str, Sequence]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score `N` completions. Returns the weighted total `[N]` and each reward's raw values `[N]`."""
        per_reward = {}
        for name, reward in self.rewards.items():
            values = reward.fn(list(completions), list(solutions), **columns)
            if len(values) != len(completions):
                raise ValueError(
                    f"reward '{name}' returned {len(values)} values for {len(completions)} completions"
                )
            for i, value in enumerate(values):
                if value is not None and not math.isfinite(value):
                    raise ValueError(
                        f"reward '{name}' returned {value} for completion {completions[i][:200]!r}; "
                        "rewards must be finite (fix the reward function)"
                    )
            per_reward[name] = torch.tensor([0.0 if v is None else float(v) for v in values])
        total = sum(self.rewards[name].weight * values for name, values in per_reward.items())
        return total, per_reward


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Advantages within each group of `group_size` consecutive completions of the same prompt.

    `A_i = (r_i - mean(r)) / (std(r) + eps)` (Visual-RFT; sample std as in the reference), or only
    `r_i - mean(r)` when `scale` is False (Dr. GRPO). Shape `[N]` in and out, `N` a multiple of `group_size`.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
