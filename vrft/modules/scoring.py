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
        for name, reward in self.rewards.items():
            if not math.isfinite(reward.weight):
                # A NaN or infinite weight makes every advantage NaN: each step would be skipped as non-finite.
                raise ValueError(
                    f"task.rewards.{name}.weight={reward.weight} is not a finite number; use e.g. 1.0"
                )

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[str], columns: Mapping[str, Sequence]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Score `N` completions. Returns the weighted total `[N]` and each reward's raw values `[N]`."""
        per_reward = {}
        for name, reward in self.rewards.items():
            try:
                values = reward.fn(list(completions), list(solutions), **columns)
            except torch.OutOfMemoryError:
                raise  # named by the run's out-of-memory handler, with the phase and what to lower
            except Exception as error:
                # A reward is the user's code: say which one failed (a bare KeyError printed only its key, a
                # TypeError a traceback). SIGTERM and Ctrl-C are not `Exception`s and pass untouched.
                raise ValueError(
                    f"reward '{name}' raised {type(error).__name__}: {error}; fix the reward function "
                    "(VRFT_TRACEBACK=1 shows where)"
                ) from error
            if len(values) != len(completions):
                raise ValueError(
                    f"reward '{name}' returned {len(values)} values for {len(completions)} completions"
                )
            per_reward[name] = torch.tensor(
                [
                    0.0 if value is None else _finite_value(name, value, completions[i])
                    for i, value in enumerate(values)
                ],
                dtype=torch.float64,
            )
        # Weighted and summed in float64; the float32 result is what advantages are computed from, so it is the
        # one checked: a sum (or a value) past float32's range would be inf there, and every advantage NaN.
        total = sum(self.rewards[name].weight * values for name, values in per_reward.items()).float()
        if not bool(torch.isfinite(total).all()):
            raise ValueError(
                f"the weighted sum of the rewards ({', '.join(self.names)}) is not finite for completion "
                f"{completions[int((~torch.isfinite(total)).nonzero()[0])][:200]!r}; scale the rewards or their "
                "weights (task.rewards.<name>.weight) down"
            )
        return total, {name: values.float() for name, values in per_reward.items()}


def _finite_value(name: str, value: object, completion: str) -> float:
    """A reward's value as a float; NaN, inf and non-numbers are a bug in the reward and raise, naming it.

    Refused rather than read as 0: a reward that silently scores NaN as 0 trains on a wrong signal, and
    None already says "no opinion".
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, str) or not math.isfinite(number):
        raise ValueError(
            f"reward '{name}' returned {value!r} for completion {completion[:200]!r}; a reward returns a "
            "finite number, or None for no opinion (fix the reward function)"
        )
    return number


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Advantages within each group of `group_size` consecutive completions of the same prompt.

    `A_i = (r_i - mean(r)) / (std(r) + eps)` (Visual-RFT; sample std as in the reference), or only
    `r_i - mean(r)` when `scale` is False (Dr. GRPO). Shape `[N]` in and out, `N` a multiple of `group_size`.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    # Shifted by each group's first reward, which changes neither mean nor std, so that a group of equal rewards
    # is exactly 0: a float mean of equal values is not always that value (three 0.9s, sixteen 2.1702408), and
    # the residues over std + eps gave advantages of up to ~2e-3 to a group that carries no signal.
    grouped = rewards.view(-1, group_size)
    shifted = grouped - grouped[:, :1]
    centred = shifted - shifted.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (shifted.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[N / group_size]` True for each group whose rewards `[N]` are all equal (its advantages are all 0).

    Compared exactly rather than by `std == 0`: a float std of equal values need not be 0.
    """
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)
