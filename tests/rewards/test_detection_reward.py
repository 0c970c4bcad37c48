"""IoU and confidence rewards against hand-computed values."""

from __future__ import annotations

import pytest

from vrft.rewards import ConfidenceReward, IoUReward, confidence_reward, iou_reward, reward_name


def answer(*entries: str) -> str:
    return "<think>t</think><answer>[" + ", ".join(entries) + "]</answer>"


def box(x1, y1, x2, y2, confidence="0.9") -> str:
    return f"{{'Position': [{x1}, {y1}, {x2}, {y2}], 'Confidence': {confidence}}}"


G1 = box(0, 0, 100, 100, 1)
G2 = box(200, 200, 300, 300, 1)
ONE = f"<answer>[{G1}]</answer>"
TWO = f"<answer>[{G1}, {G2}]</answer>"
NONE = "<answer>No Objects</answer>"
MANY_BOXES = answer(box(0, 0, 100, 100), *[box(400 + i, 400, 450 + i, 450, "0.1") for i in range(149)])

# (completion, solution, IoU reward, confidence reward)
CASES = [
    (answer(box(0, 0, 100, 100)), ONE, 1.0, 0.9),
    (answer(box(0, 0, 100, 80, "0.8")), ONE, 0.8, 0.8),  # IoU 8000/10000
    (answer(box(0, 0, 100, 51, "0.6")), ONE, 0.51, 0.6),  # IoU 0.51 > 0.5: matched
    (answer(box(0, 0, 100, 50, "0.7")), ONE, 0.0, 0.3),  # IoU exactly 0.5 is not a match; conf 1 - 0.7
    (answer(box(0, 0, 100, 100), box(200, 200, 300, 300, "0.8")), TWO, 1.0, 0.85),  # (0.9 + 0.8) / 2
    (answer(box(0, 0, 100, 100)), TWO, 0.5, 0.9),  # one of two found: 1 / max(2, 1)
    (answer(box(0, 0, 100, 100), box(500, 500, 600, 600, "0.2")), ONE, 0.5, 0.85),  # FP: 1/2; (0.9 + 0.8) / 2
    # Same box twice (any confidence) is one prediction; the first occurrence is kept.
    (answer(box(0, 0, 100, 100), box(0, 0, 100, 100, "0.3")), ONE, 1.0, 0.9),
    # Greedy by confidence: the 0.9 box (IoU 0.6) takes G1 first, so the exact 0.5 box is unmatched:
    # IoU 0.6 / 2 = 0.3; conf (0.9 + (1 - 0.5)) / 2 = 0.7.
    (answer(box(0, 0, 100, 60), box(0, 0, 100, 100, "0.5")), ONE, 0.3, 0.7),
    (answer(box(100, 100, 0, 0)), ONE, 1.0, 0.9),  # swapped corners are reordered
    (answer(box(0, 0, 100, 100, "NaN")), ONE, 1.0, 0.0),  # NaN confidence reads as 0
    (answer(box(0, 0, 100, 100, "Infinity")), ONE, 1.0, 1.0),  # clipped to 1
    (answer(box(0, 0, 100, 100, "1.7")), ONE, 1.0, 1.0),  # clipped to 1
    (answer(box(500, 500, 600, 600, "-0.5")), ONE, 0.0, 1.0),  # clipped to 0, unmatched: 1 - 0
    (answer("{'Position': [0, 0, 100, 100]}"), ONE, 1.0, 0.0),  # missing confidence reads as 0
    (answer("{'Position': [0, 0, 100, 100], 'Confidence': '0.9'}"), ONE, 1.0, 0.9),  # quoted number
    (answer('{"position": [0.0, 0.0, 100.0, 100.0], "confidence": 0.9}'), ONE, 1.0, 0.9),  # JSON, floats
    ("<answer>[[{'Position': [[0, 0, 100, 100]], 'Confidence': 0.9}]]</answer>", ONE, 1.0, 0.9),  # [[ ]]
    ("<answer>[{'Position': [0, 0, 100, 100],\n 'Confidence': 0.9}\n]</answer>", ONE, 1.0, 0.9),  # newlines
    # A cut-off list keeps its complete entries; a missing </answer> is tolerated.
    (f"<answer>[{box(0, 0, 100, 100)}, {{'Position': [200, 2", TWO, 0.5, 0.9),
    (f"<answer>[{box(0, 0, 100, 100)}]", ONE, 1.0, 0.9),
    ("<answer>No Objects</answer>", NONE, 1.0, 1.0),  # the right answer for an absent category
    ("<answer>no objects.</answer>", NONE, 1.0, 1.0),
    ("<answer>[]</answer>", NONE, 1.0, 1.0),
    ("<answer>No Objects</answer>", ONE, 0.0, 0.0),  # missed every box
    (answer(box(0, 0, 10, 10, "0.3")), NONE, 0.0, 0.7),  # only false positives: conf 1 - 0.3
    ("<answer>I see a cat</answer>", ONE, 0.0, 0.0),  # unreadable
    ("<answer></answer>", ONE, 0.0, 0.0),
    ("", ONE, 0.0, 0.0),
    (answer("{'Position': [0, 0, 100], 'Confidence': 0.9}"), ONE, 0.0, 0.0),  # 3 coordinates: unreadable
    (answer(box(0, 0, "nan", 100)), ONE, 0.0, 0.0),  # non-finite coordinate: unreadable
    (answer(box(0, 0, "1e300", "1e300")), ONE, 0.0, 0.1),  # area overflows: IoU 0, not NaN
    (answer(box(-50, -50, 100, 100)), ONE, 0.0, 0.1),  # IoU 10000 / 22500 = 0.44: unmatched
    (f"[{box(0, 0, 100, 100)}]", ONE, 0.0, 0.0),  # no <answer>: default mode reads nothing
    # 150 boxes: only the first 100 count; 1 match with IoU 1 -> 1/100; conf (0.9 + 99 * (1 - 0.1)) / 100.
    (MANY_BOXES, ONE, 0.01, 0.9),
]


@pytest.mark.parametrize(("completion", "solution", "iou", "confidence"), CASES)
def test_detection_rewards_cases(completion, solution, iou, confidence):
    assert iou_reward([completion], [solution]) == [pytest.approx(iou)]
    assert confidence_reward([completion], [solution]) == [pytest.approx(confidence)]


def test_compat_reads_completions_without_answer_tags():
    completion = f"[{box(0, 0, 100, 100)}]"
    assert IoUReward(compat=True)([completion], [ONE]) == [1.0]
    assert ConfidenceReward(compat=True)([completion], [ONE]) == [pytest.approx(0.9)]


@pytest.mark.parametrize(
    ("predicted", "truth", "clamped", "unclamped"),
    [
        # [-50, -50, 100, 100] clamps to G1 exactly; unclamped IoU is 0.44 (unmatched).
        (box(-50, -50, 100, 100), ONE, 1.0, 0.0),
        # [900, 900, 1200, 1200] vs [900, 900, 1000, 1000]: 1/9 unclamped, exact when clamped to 1000.
        (box(900, 900, 1200, 1200), f"<answer>[{box(900, 900, 1000, 1000, 1)}]</answer>", 1.0, 0.0),
    ],
)
def test_coord_max_clamps_predictions(predicted, truth, clamped, unclamped):
    assert IoUReward(coord_max=1000)([answer(predicted)], [truth]) == [pytest.approx(clamped)]
    assert IoUReward()([answer(predicted)], [truth]) == [pytest.approx(unclamped)]


def test_ground_truth_with_more_than_max_boxes_is_read_whole():
    truth = "<answer>[" + ", ".join(box(i * 5, 0, i * 5 + 4, 4, 1) for i in range(150)) + "]</answer>"
    # Predicting the first box only: 1 match of IoU 1 over max(150, 1).
    assert iou_reward([answer(box(0, 0, 4, 4))], [truth]) == [pytest.approx(1 / 150)]


def test_names():
    assert reward_name(iou_reward) == "iou"
    assert reward_name(confidence_reward) == "confidence"
