"""Helpers for tests that run the real CLI."""

from __future__ import annotations


def length_reward(completions: list[str], solutions: list[str], **columns) -> list[float]:
    """A reward that varies across a random model's completions, so GRPO has a non-zero advantage."""
    return [len(completion) / 100 for completion in completions]


# Hydra overrides adding `length_reward` to the task's rewards.
LENGTH_REWARD = [
    "+task.rewards.length._target_=vrft.modules.scoring.WeightedReward",
    "+task.rewards.length.fn._target_=tests.support.length_reward",
    "+task.rewards.length.fn._partial_=true",
]
