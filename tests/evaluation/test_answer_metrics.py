"""Classification accuracy and grounding mIoU against hand-computed values."""

from __future__ import annotations

import pytest

from vrft.evaluation.answer_metrics import classification_accuracy, grounding_miou


def test_classification_accuracy_uses_the_reward_rule():
    solutions = [
        "<answer>daisy</answer>",
        "<answer>pink primrose</answer>",
        "<answer>rose</answer>",
        "<answer>tulip</answer>",
    ]
    completions = [
        "<answer>Daisy</answer>",
        "<answer>pink_primrose</answer>",
        "<answer>tulip</answer>",
        "<answer></answer>",
    ]
    assert classification_accuracy(completions, solutions) == pytest.approx(0.5)
    assert classification_accuracy(completions, solutions, compat=True) == pytest.approx(
        0.75
    )  # empty answer scores
    with pytest.raises(ValueError, match="one completion per solution"):
        classification_accuracy([], [])


def test_classification_accuracy_pays_no_letter_and_no_class_list():
    solutions = [
        "<answer>red</answer>",
        "<answer>green</answer>",
        "<answer>blue</answer>",
        "<answer>yellow</answer>",
    ]
    for gamed in ("<answer>e</answer>", "<answer>red green blue yellow</answer>"):
        assert classification_accuracy([gamed] * 4, solutions) == 0.0
        assert classification_accuracy([gamed] * 4, solutions, compat=True) == 1.0  # the paper's rule
    # With the class list given, two classes are wrong even when the rows hold one label only.
    two = ["<answer>red or blue</answer>"]
    assert classification_accuracy(two, solutions[:1]) == 1.0
    assert classification_accuracy(two, solutions[:1], classes=["red", "green", "blue", "yellow"]) == 0.0


def test_grounding_miou():
    truth = "<answer>(100,100),(200,200)</answer>"
    completions = [
        "<answer>(100,100),(200,200)</answer>",  # IoU 1
        "<answer>(150,100),(250,200)</answer>",  # IoU 5000 / 15000 = 1/3
        "<answer>no box</answer>",  # 0
    ]
    assert grounding_miou(completions, [truth] * 3) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert grounding_miou(["(100,100),(200,200)"], [truth]) == 0.0
    assert grounding_miou(["(100,100),(200,200)"], [truth], compat=True) == pytest.approx(1.0)
