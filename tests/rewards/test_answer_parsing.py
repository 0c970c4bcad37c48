"""Shared parsing helpers, box geometry and reward naming."""

from __future__ import annotations

import functools

import pytest

from vrft.rewards import Detection, box_giou, box_iou, extract_answer, parse_detection_answer, reward_name
from vrft.rewards.boxes import convention_to_pixels, pixels_to_convention
from vrft.rewards.parsing import completion_text, format_detection_answer, format_grounding_answer


@pytest.mark.parametrize(
    ("text", "allow_unclosed", "expected"),
    [
        ("<answer> a </answer>", False, "a"),
        ("x<answer>a</answer><answer>b</answer>", False, "a"),
        ("<answer>a\nb</answer>", False, "a\nb"),
        ("<answer>a", False, None),
        ("<answer>a", True, "a"),
        ("no tags", True, None),
    ],
)
def test_extract_answer(text, allow_unclosed, expected):
    assert extract_answer(text, allow_unclosed=allow_unclosed) == expected


def test_parse_detection_answer_normalises_and_caps():
    parsed = parse_detection_answer("[{'Position': [10, 20, 0, 5], 'Confidence': 2}]")
    assert parsed == [Detection((0.0, 5.0, 10.0, 20.0), 1.0)]
    many = "[" + ", ".join("{'Position': [0, 0, 1, 1]}" for _ in range(300)) + "]"
    assert len(parse_detection_answer(many)) == 100
    assert len(parse_detection_answer(many, max_boxes=None, max_chars=None)) == 300
    assert parse_detection_answer("No Objects") == []
    assert parse_detection_answer("nothing here") is None


def test_answer_writers_round_trip():
    boxes = [[1, 2, 3, 4], [5, 6, 7, 8]]
    written = extract_answer(format_detection_answer(boxes))
    assert [list(d.box) for d in parse_detection_answer(written)] == boxes
    assert format_detection_answer([]) == "<answer>No Objects</answer>"
    assert format_grounding_answer([1, 2, 3, 4]) == "<answer>(1,2),(3,4)</answer>"


def test_box_geometry():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union
    assert box_giou((0, 0, 10, 10), (20, 0, 30, 10)) == pytest.approx(-1 / 3)  # enclosing 300, union 200


def test_coordinate_conventions():
    assert pixels_to_convention([20, 10, 60, 40], 200, 100, "qwen2vl") == [100, 100, 300, 400]
    assert pixels_to_convention([20.4, 10.6, 60, 40], 200, 100, "absolute") == [20, 11, 60, 40]
    assert convention_to_pixels([100, 100, 300, 400], 200, 100, "qwen2vl") == (20, 10, 60, 40)
    with pytest.raises(ValueError, match="'qwen2vl'.*'absolute'"):
        pixels_to_convention([0, 0, 1, 1], 1, 1, "normalized")


def test_completion_text_accepts_chat_messages():
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    assert completion_text(None) == ""


def test_reward_name_of_functions_and_partials():
    def my_reward(completions, solutions, **columns):
        return [0.0] * len(completions)

    assert reward_name(my_reward) == "my_reward"
    assert reward_name(functools.partial(my_reward)) == "my_reward"
