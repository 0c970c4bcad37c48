"""Solution checkers: valid ground truth passes, bad ground truth names the value and the fix."""

from __future__ import annotations

import pytest

from vrft.rewards import check_classification_solution, check_detection_solution, check_grounding_solution
from vrft.rewards.parsing import MAX_SOLUTION_BOXES, MAX_SOLUTION_CHARS, format_detection_answer


@pytest.mark.parametrize("solution", ["<answer>daisy</answer>", "<answer> Pink Primrose </answer>"])
def test_classification_valid(solution):
    check_classification_solution(solution)


@pytest.mark.parametrize(
    ("solution", "message"),
    [
        ("daisy", "wrap the ground truth as <answer>label</answer>"),
        ("<answer>daisy", "wrap the ground truth"),
        ("<answer> _ </answer>", "empty label"),
    ],
)
def test_classification_invalid(solution, message):
    with pytest.raises(ValueError, match=message) as error:
        check_classification_solution(solution)
    assert repr(solution) in str(error.value)


@pytest.mark.parametrize(
    "solution",
    [
        "<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}]</answer>",
        "<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}, {'Position': [5, 5, 9, 9], 'Confidence': 1}]</answer>",
        "<answer>No Objects</answer>",
        "<answer>[]</answer>",
    ],
)
def test_detection_valid(solution):
    check_detection_solution(solution)


@pytest.mark.parametrize(
    ("solution", "message"),
    [
        ("[{'Position': [1, 2, 30, 40], 'Confidence': 1}]", "has no <answer>"),
        (
            "<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}, {'Posi</answer>",
            "not a complete detection list",
        ),
        ("<answer>a cat</answer>", "not a complete detection list"),
        ("<answer>[{'Position': [1, 2, 1, 40], 'Confidence': 1}]</answer>", "zero area"),
    ],
)
def test_detection_invalid(solution, message):
    with pytest.raises(ValueError, match=message):
        check_detection_solution(solution)


@pytest.mark.parametrize("solution", ["<answer>(1,2),(30,40)</answer>", "<answer>[1, 2, 30, 40]</answer>"])
def test_grounding_valid(solution):
    check_grounding_solution(solution)


@pytest.mark.parametrize(
    ("solution", "message"),
    [
        ("(1,2),(30,40)", "has no <answer>"),
        ("<answer>the cat</answer>", "has no box"),
        ("<answer>(1,2),(1,40)</answer>", "zero area"),
    ],
)
def test_grounding_invalid(solution, message):
    with pytest.raises(ValueError, match=message):
        check_grounding_solution(solution)


@pytest.mark.parametrize(
    "check", [check_classification_solution, check_detection_solution, check_grounding_solution]
)
def test_oversized_solution_is_refused_before_parsing(check):
    solution = f"<answer>(1,1){' ' * (MAX_SOLUTION_CHARS + 1)},(2,2)</answer>"
    with pytest.raises(ValueError, match=f"more than the {MAX_SOLUTION_CHARS:,} a ground-truth row may hold"):
        check(solution)


def test_detection_solution_with_too_many_boxes_is_refused():
    boxes = [[i, 0, i + 1, 1] for i in range(MAX_SOLUTION_BOXES + 1)]
    with pytest.raises(
        ValueError, match=f"{MAX_SOLUTION_BOXES + 1} boxes, more than the {MAX_SOLUTION_BOXES}"
    ):
        check_detection_solution(format_detection_answer(boxes))
    check_detection_solution(format_detection_answer(boxes[:MAX_SOLUTION_BOXES]))


def test_one_letter_label_is_refused():
    with pytest.raises(ValueError, match="fewer than 2 letters or digits"):
        check_classification_solution("<answer>e</answer>")
