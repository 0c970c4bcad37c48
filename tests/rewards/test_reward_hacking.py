"""Reward hacking: strategies a policy can find, scored with each task's configured rewards.

Every test scores a small dataset with the task's reward set as the config builds it (format + the
task's rewards, `conf/task/*.yaml`), once for the honest answer and once for each gaming strategy.
Under the defaults the honest answer wins on average; under `task.strict=true` it is never below a
constant strategy on any row and strictly above every one on average.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vrft.modules.scoring import RewardSet
from vrft.rewards.parsing import format_detection_answer, format_grounding_answer

CONF = str(Path(__file__).resolve().parents[2] / "conf")
LETTERS = [f"<answer>{letter}</answer>" for letter in "abcdefghijklmnopqrstuvwxyz"]
TEXT_CONSTANTS = ["<answer></answer>", "<answer>No Objects</answer>", "", "e", *LETTERS]


def task_rewards(task: str, *overrides: str) -> RewardSet:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", *overrides])
    return RewardSet(instantiate(cfg.task.rewards))


def totals(rewards: RewardSet, answers: list[str], solutions: list[str]) -> torch.Tensor:
    """Total reward `[N]` of each answer (wrapped in the format the format reward pays) against its row."""
    completions = [
        f"<think>t</think>{answer}" if answer.startswith("<answer>") else answer for answer in answers
    ]
    total, _ = rewards(completions, solutions, {})
    return total


def assert_honest_wins(rewards, honest, strategies, solutions, per_row: bool) -> None:
    honest_total = totals(rewards, honest, solutions)
    for name, answers in strategies.items():
        gamed = totals(rewards, answers, solutions)
        assert honest_total.mean() > gamed.mean(), (
            f"{name} earns {gamed.mean():.3f} >= honest {honest_total.mean():.3f}"
        )
        if per_row:
            assert (honest_total >= gamed).all(), f"{name} beats the honest answer on some row"


# --------------------------------------------------------------------------------------------- classification
CLASSES = ["red", "green", "blue", "yellow"]  # the default run's classes
LABELS = [*CLASSES, "red", "blue"]
CLASS_SOLUTIONS = [f"<answer>{label}</answer>" for label in LABELS]
CLASS_STRATEGIES = {
    "every class": "<answer>red green blue yellow</answer>",
    "every class, in a sentence": "<answer>It is red, green, blue or yellow.</answer>",
    "two classes": "<answer>red or blue</answer>",
    "a class without tags": "red",
    **{f"constant {label}": f"<answer>{label}</answer>" for label in CLASSES},
    **{f"text {text!r}": text for text in TEXT_CONSTANTS},
}


@pytest.mark.parametrize("overrides", [[], ["task.classes=[red,green,blue,yellow]"]], ids=["batch", "config"])
def test_classification_honest_answer_beats_letters_and_class_lists(overrides):
    rewards = task_rewards("classification", *overrides)
    honest = [f"<answer>{label}</answer>" for label in LABELS]
    strategies = {name: [answer] * len(LABELS) for name, answer in CLASS_STRATEGIES.items()}
    assert_honest_wins(rewards, honest, strategies, CLASS_SOLUTIONS, per_row=True)
    _, per_reward = rewards(["<think>t</think><answer>e</answer>"] * len(LABELS), CLASS_SOLUTIONS, {})
    assert per_reward["accuracy"].tolist() == [0.0] * len(LABELS)


def test_classification_paper_rule_pays_a_letter_and_a_class_list():
    # The documented loophole of task.rewards.accuracy.fn.compat=true: "e" is inside every class name.
    rewards = task_rewards("classification", "task.rewards.accuracy.fn.compat=true")
    for answer in ("<answer>e</answer>", "<answer>red green blue yellow</answer>"):
        _, per_reward = rewards([f"<think>t</think>{answer}"] * len(LABELS), CLASS_SOLUTIONS, {})
        assert per_reward["accuracy"].tolist() == [1.0] * len(LABELS)


# --------------------------------------------------------------------------------------------- detection
TRUTH_BOXES = [[[100, 100, 300, 300]], [[500, 500, 900, 800], [50, 600, 250, 950]], [[0, 0, 400, 500]], []]
DETECTION_SOLUTIONS = [format_detection_answer(boxes) for boxes in TRUTH_BOXES]


def detections(boxes, confidence, extra=(), extra_confidence=0) -> str:
    """A detection answer: `boxes` at `confidence`, then `extra` boxes at `extra_confidence`."""
    entries = [(box, confidence) for box in boxes] + [(box, extra_confidence) for box in extra]
    if not entries:
        return "<answer>No Objects</answer>"
    listed = ", ".join(f"{{'Position': {list(box)}, 'Confidence': {c}}}" for box, c in entries)
    return f"<answer>[{listed}]</answer>"


WHOLE_IMAGE = [[0, 0, 1000, 1000]]
TILES = [[x, y, x + 250, y + 250] for x in range(0, 1000, 250) for y in range(0, 1000, 250)]
DETECTION_CONSTANTS = {
    **{f"whole image, confidence {c}": detections(WHOLE_IMAGE, c) for c in (0, 0.5, 1, 7, -3)},
    **{f"small box, confidence {c}": detections([[10, 10, 20, 20]], c) for c in (0, 1)},
    **{f"16 tiles, confidence {c}": detections(TILES, c) for c in (0, 1)},
    "empty list": "<answer>[]</answer>",
    **{f"text {text!r}": text for text in TEXT_CONSTANTS},
}


def constant_detections() -> dict[str, list[str]]:
    return {name: [answer] * len(TRUTH_BOXES) for name, answer in DETECTION_CONSTANTS.items()}


def padded_detections() -> dict[str, list[str]]:
    """The honest boxes padded with copies: exact duplicates, or shifted copies at confidence 0."""
    shifted = [[[x1 + 2, y1 + 2, x2 + 2, y2 + 2] for x1, y1, x2, y2 in boxes] for boxes in TRUTH_BOXES]
    return {
        "honest boxes, each 5 times": [detections(boxes * 5, 1) for boxes in TRUTH_BOXES],
        "honest boxes + shifted copies at confidence 0": [
            detections(boxes, 1, extra=copies) for boxes, copies in zip(TRUTH_BOXES, shifted, strict=True)
        ],
    }


@pytest.mark.parametrize("strict", [False, True], ids=["paper", "strict"])
def test_detection_duplicated_boxes_earn_nothing_extra(strict):
    rewards = task_rewards("detection", f"task.strict={str(strict).lower()}")
    honest = totals(rewards, [detections(boxes, 1) for boxes in TRUTH_BOXES], DETECTION_SOLUTIONS)
    padded = padded_detections()
    exact = totals(rewards, padded["honest boxes, each 5 times"], DETECTION_SOLUTIONS)
    assert torch.equal(exact, honest)  # exact duplicates are dropped before matching
    shifted = totals(rewards, padded["honest boxes + shifted copies at confidence 0"], DETECTION_SOLUTIONS)
    assert (shifted <= honest).all() and shifted.mean() < honest.mean()


def test_detection_honest_answer_wins_under_the_defaults():
    rewards = task_rewards("detection")
    honest = [detections(boxes, 1) for boxes in TRUTH_BOXES]
    assert_honest_wins(rewards, honest, constant_detections(), DETECTION_SOLUTIONS, per_row=True)
    # Confidence outside [0, 1] is clipped: it buys nothing over confidence 1.
    overconfident = totals(rewards, [detections(boxes, 5) for boxes in TRUTH_BOXES], DETECTION_SOLUTIONS)
    assert torch.equal(overconfident, totals(rewards, honest, DETECTION_SOLUTIONS))


def test_detection_zero_confidence_box_loophole_is_closed_by_strict():
    solutions = DETECTION_SOLUTIONS[:3]  # images with objects
    zero_box = [detections([[10, 10, 20, 20]], 0)] * 3
    _, paper = task_rewards("detection")(zero_box, solutions, {})
    _, strict = task_rewards("detection", "task.strict=true")(zero_box, solutions, {})
    assert paper["confidence"].tolist() == [1.0, 1.0, 1.0]  # the paper's reward: full confidence reward
    assert strict["confidence"].tolist() == [0.0, 0.0, 0.0]


def test_detection_honest_answer_strictly_beats_every_constant_under_strict():
    rewards = task_rewards("detection", "task.strict=true")
    honest = [detections(boxes, 1) for boxes in TRUTH_BOXES]
    assert_honest_wins(rewards, honest, constant_detections(), DETECTION_SOLUTIONS, per_row=True)


# --------------------------------------------------------------------------------------------- grounding
TARGETS = [[100, 100, 300, 300], [600, 200, 950, 500], [0, 500, 500, 1000], [400, 400, 450, 450]]
GROUNDING_SOLUTIONS = [format_grounding_answer(box) for box in TARGETS]
GRID = range(0, 1001, 250)
GROUNDING_CONSTANTS = {
    **{
        f"constant box {box}": format_grounding_answer(box)
        for box in ([x1, y1, x2, y2] for x1 in GRID for y1 in GRID for x2 in GRID for y2 in GRID)
        if box[0] < box[2] and box[1] < box[3]
    },
    **{f"text {text!r}": text for text in TEXT_CONSTANTS},
}


@pytest.mark.parametrize("strict", [False, True], ids=["paper", "strict"])
def test_grounding_honest_box_strictly_beats_every_constant_box(strict):
    rewards = task_rewards("grounding", f"task.strict={str(strict).lower()}")
    strategies = {name: [answer] * len(TARGETS) for name, answer in GROUNDING_CONSTANTS.items()}
    assert len(strategies) > 100
    assert_honest_wins(rewards, GROUNDING_SOLUTIONS, strategies, GROUNDING_SOLUTIONS, per_row=True)


def test_grounding_whole_image_box_is_paid_only_by_the_paper_reward():
    whole = ["<think>t</think><answer>(0,0),(1000,1000)</answer>"] * len(TARGETS)
    _, paper = task_rewards("grounding")(whole, GROUNDING_SOLUTIONS, {})
    _, strict = task_rewards("grounding", "task.strict=true")(whole, GROUNDING_SOLUTIONS, {})
    assert (paper["grounding"] >= 1.0).all()  # GIoU + 1 of a box enclosing the target is at least 1
    assert strict["grounding"].tolist() == [0.0] * len(TARGETS)  # every target covers under half the image
