"""Property tests: no string crashes a reward, and every value is finite and in range."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrft.rewards import (
    AccuracyReward,
    ConfidenceReward,
    FormatReward,
    GroundingReward,
    IoUReward,
)
from vrft.rewards.parsing import format_detection_answer

REWARDS = [
    FormatReward(),
    AccuracyReward(),
    AccuracyReward(compat=True),
    IoUReward(),
    IoUReward(compat=True, coord_max=1000),
    ConfidenceReward(),
    ConfidenceReward(compat=True, coord_max=1000),
    GroundingReward(),
    GroundingReward(compat=True, coord_max=1000),
    ConfidenceReward(strict=True),
    GroundingReward(strict=True),
    AccuracyReward(classes=["daisy", "rose"]),
]
SOLUTIONS = [
    "<answer>daisy</answer>",
    "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}, {'Position': [50, 50, 300, 300], 'Confidence': 1}]</answer>",
    "<answer>No Objects</answer>",
    "<answer>(100,100),(200,200)</answer>",
    "",
]
PIECES = st.sampled_from(
    [
        "<think>", "</think>", "<answer>", "</answer>", "[", "]", "[[", "]]", "{", "}", "(", ")", ",", ":", "'",
        '"', " ", "\n", "'Position'", "'Confidence'", "Position", "No Objects", "nan", "NaN", "inf", "-inf",
        "Infinity", "1e999", "-1e308", "0", "1", "0.5", "-3", "1000", "99999999999999999999", ".", "e", "-",
        "daisy", "_",
    ]
)  # fmt: skip
TEXTS = st.one_of(st.text(max_size=200), st.lists(PIECES, max_size=60).map("".join))
# Whitespace runs of up to 30k characters between the pieces: the inputs that made the regexes quadratic.
RUNS = st.integers(0, 30_000).flatmap(lambda n: st.sampled_from([" " * n, "\n" * n, "\t " * (n // 2)]))
SPACED = st.lists(st.one_of(PIECES, RUNS), max_size=12).map("".join)
BOX = st.lists(st.integers(-10, 1010), min_size=4, max_size=4)
# Ground truths past the caps (MAX_SOLUTION_BOXES, MAX_SOLUTION_CHARS) as well as within them.
LARGE_SOLUTIONS = st.one_of(
    st.lists(BOX, max_size=400).map(format_detection_answer),
    st.tuples(BOX, RUNS).map(
        lambda pair: f"<answer>({pair[0][0]},{pair[0][1]}){pair[1]},({pair[0][2]},{pair[0][3]})</answer>"
    ),
    RUNS.map(lambda run: f"<answer>{run}daisy{run}</answer>"),
)


def check(reward, completions, solutions):
    values = reward(completions, solutions, problem=["p"] * len(completions))
    assert len(values) == len(completions)
    for value in values:
        assert isinstance(value, float) and math.isfinite(value)
        assert reward.low <= value <= reward.high


@pytest.mark.parametrize("reward", REWARDS, ids=repr)
@settings(max_examples=150, deadline=None)
@given(completion=TEXTS, solution=st.one_of(st.sampled_from(SOLUTIONS), TEXTS))
def test_any_text_gives_a_finite_reward_in_range(reward, completion, solution):
    check(reward, [completion], [solution])


@pytest.mark.parametrize("reward", REWARDS, ids=repr)
@settings(max_examples=25, deadline=None)  # no time budget here: bench/rewards/worst_case.py measures it
@given(completion=st.one_of(SPACED, TEXTS), solution=st.one_of(LARGE_SOLUTIONS, SPACED))
def test_whitespace_runs_and_large_ground_truths(reward, completion, solution):
    check(reward, [completion], [solution])


@pytest.mark.parametrize("reward", REWARDS, ids=repr)
def test_huge_and_adversarial_strings(reward):
    entry = "{'Position': [1, 2, 3, 4], 'Confidence': 0.5}, "
    completions = [
        "<answer>[" + entry * 50_000 + "]</answer>",
        "<answer>" * 20_000,
        "<think>" + "</think><answer>" * 20_000,
        "[" * 100_000 + "1",
        "<answer>(" + "1" * 100_000 + ",1),(2,2)</answer>",
        "<answer>[{'Position': [" + "9" * 50_000 + "]}]</answer>",
        "\x00\udcff" * 1000,
    ]
    check(reward, completions, [SOLUTIONS[1]] * len(completions))
