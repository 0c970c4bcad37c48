"""Format reward against hand-checked strings, and the linear check against the reference regex."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrft.rewards import FormatReward, format_reward, reward_name
from vrft.rewards.format import FORMAT_PATTERN, matches_answer_format

CASES = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a</think>\n\n<answer>b</answer>", 1.0),
    ("<think>a</think> <answer>b</answer>", 1.0),
    ("<think>a</think>\t<answer>b</answer>", 1.0),
    ("  <think>a</think><answer>b</answer>\n", 1.0),  # stripped first
    ("<think>line 1\nline 2</think><answer>multi\nline</answer>", 1.0),  # DOTALL
    ("<think></think><answer></answer>", 1.0),  # empty sections still follow the format
    ("<think>a</think>b</think><answer>c</answer>", 1.0),  # the first .*? may contain </think>
    ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),  # the last .*? may contain tags
    ("<think>a</think><answer></think><answer>b</answer>", 1.0),  # separator found at the first </think>
    ("<answer>b</answer>", 0.0),  # no think
    ("<think>a</think>", 0.0),  # no answer
    ("x<think>a</think><answer>b</answer>", 0.0),  # text before
    ("<think>a</think><answer>b</answer>.", 0.0),  # text after
    ("<think>a</think> so <answer>b</answer>", 0.0),  # text between
    ("<think>a</think><answer>b", 0.0),  # cut off
    ("<think>a</think><answer>b</answer", 0.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # tags are case-sensitive
    ("<think><answer>b</answer>", 0.0),  # no </think>
    ("", 0.0),
    ("<think>a</think><answer>", 0.0),
    ("<think></think><answer>", 0.0),  # <answer> cannot double as the closing </answer>
]


@pytest.mark.parametrize(("completion", "expected"), CASES)
def test_format_reward_cases(completion, expected):
    assert format_reward([completion], ["<answer>x</answer>"]) == [expected]
    # The hand-written expectation agrees with the reference regex on every case.
    assert bool(re.fullmatch(FORMAT_PATTERN, completion.strip(), re.DOTALL)) == (expected == 1.0)


FRAGMENTS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "a", "<", ">", "/"])


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=12).map("".join))
def test_linear_check_equals_reference_regex(text):
    assert matches_answer_format(text) == bool(re.fullmatch(FORMAT_PATTERN, text.strip(), re.DOTALL))


def test_repeated_tags_do_not_backtrack():
    # The reference regex needs seconds on this; the linear check must simply return.
    adversarial = "<think>" + "</think><answer>" * 20_000 + "x"
    assert format_reward([adversarial], [""]) == [0.0]


def test_format_reward_is_named_and_accepts_extra_columns():
    assert reward_name(format_reward) == "format"
    assert FormatReward()(["<think>a</think><answer>b</answer>"], ["s"], problem=["p"], image=[None]) == [1.0]
