"""Rewards summed per completion and group-normalised advantages, against hand-computed values."""

import math

import pytest
import torch

from vrft.modules.scoring import RewardSet, WeightedReward, group_advantages, zero_spread_groups


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv = group_advantages(rewards, group_size=4, eps=1e-4)
    # group 1: mean 1, sample std sqrt((0 + 1 + 1 + 0) / 3) = 0.8165
    std = math.sqrt(2 / 3)
    expected_first = torch.tensor([0.0, -1.0, 1.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4], expected_first)
    # group 2: all equal -> zero advantage, not NaN
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_without_scaling_is_centred_reward():
    adv = group_advantages(torch.tensor([1.0, 3.0]), group_size=2, scale=False)
    assert adv.tolist() == [-1.0, 1.0]


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(4), group_size=3)


def test_reward_set_weighted_sum_and_none():
    def length_reward(completions, solutions, **columns):
        return [float(len(c)) for c in completions]

    def no_opinion(completions, solutions, **columns):
        return [None, 1.0]

    rewards = RewardSet(
        {"length": WeightedReward(length_reward, 0.5), "maybe": {"fn": no_opinion, "weight": 2.0}}
    )
    total, per = rewards(["ab", "abcd"], ["x", "y"], {"problem": ["p", "q"]})
    assert per["length"].tolist() == [2.0, 4.0]
    assert per["maybe"].tolist() == [0.0, 1.0]
    assert total.tolist() == [1.0, 4.0]


def test_reward_set_rejects_nan_naming_the_reward():
    rewards = RewardSet({"broken": WeightedReward(lambda c, s, **k: [float("nan")] * len(c))})
    with pytest.raises(ValueError, match="reward 'broken' returned nan"):
        rewards(["a"], ["b"], {})


@pytest.mark.parametrize("value", [float("inf"), "1.0", [1.0], object()])
def test_reward_set_refuses_values_that_are_not_finite_numbers_naming_the_reward(value):
    # A NaN or inf reward is refused, not read as 0: a reward that scores garbage is a bug to fix, and None
    # already means "no opinion". A string or list raised a bare TypeError (or passed, for "1.0").
    rewards = RewardSet({"broken": WeightedReward(lambda c, s, **k: [value] * len(c))})
    with pytest.raises(
        ValueError, match="reward 'broken' returned .* for completion 'a'; a reward returns a finite"
    ):
        rewards(["a"], ["b"], {})


def test_reward_set_refuses_a_weighted_sum_past_float32():
    # Each value and weight is finite, but 2 x 3e38 is inf in float32: every advantage of the group was NaN.
    rewards = RewardSet({"huge": WeightedReward(lambda c, s, **k: [3e38] * len(c), weight=2.0)})
    with pytest.raises(
        ValueError, match=r"weighted sum of the rewards \(huge\) is not finite for completion 'a'"
    ):
        rewards(["a", "b"], ["x", "y"], {})


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_reward_set_refuses_a_weight_that_is_not_finite(weight):
    with pytest.raises(ValueError, match=r"task.rewards.format.weight=(nan|inf) is not a finite number"):
        RewardSet({"format": WeightedReward(lambda c, s, **k: [1.0] * len(c), weight=weight)})


def test_reward_set_sums_in_float64():
    # 1e8 + 1 - 1e8 is 0 in float32 (the old sum) and 1 in float64: totals of rewards on different scales keep
    # their small terms.
    rewards = RewardSet(
        {
            "big": WeightedReward(lambda c, s, **k: [1e8] * len(c)),
            "small": WeightedReward(lambda c, s, **k: [1.0, 0.0]),
            "minus": WeightedReward(lambda c, s, **k: [1e8] * len(c), weight=-1.0),
        }
    )
    total, _ = rewards(["a", "b"], ["x", "y"], {})
    assert total.tolist() == [1.0, 0.0]


def test_a_group_of_equal_rewards_gets_exactly_zero_advantages():
    # Measured: 16 float32 rewards of 2.1702408467537326 (a detection total) do not average to that value; the
    # residues over std + eps were advantages up to 2.4e-3 in a group with no signal (and its std, computed
    # alone, 2.5e-7 rather than 0). Zero here is exact, not a tolerance.
    rewards = torch.full((16,), 2.1702408467537326)
    assert torch.equal(group_advantages(rewards, 16), torch.zeros(16))
    assert torch.equal(group_advantages(rewards, 16, scale=False), torch.zeros(16))
    assert zero_spread_groups(torch.cat([rewards, torch.arange(16.0)]), 16).tolist() == [True, False]


@pytest.mark.parametrize("error", [KeyError("category"), TypeError("unsupported operand")])
def test_a_reward_that_raises_is_named(error):
    # The CLI printed a bare KeyError as its key alone ("vrft: error: 'category'") and a TypeError as a
    # traceback, neither naming the reward.
    def broken(completions, solutions, **columns):
        raise error

    rewards = RewardSet({"length": WeightedReward(broken)})
    with pytest.raises(
        ValueError, match=f"reward 'length' raised {type(error).__name__}: .*fix the reward function"
    ):
        rewards(["a"], ["b"], {})
