"""Synthetic data: schema, determinism, answers the rewards accept, boxes that match the pixels."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from vrft.data.synthetic import (
    COLORS,
    SHAPES,
    Shape,
    draw_shapes,
    make_synthetic_dataset,
    write_synthetic_dataset,
)
from vrft.rewards import (
    accuracy_reward,
    check_classification_solution,
    check_detection_solution,
    check_grounding_solution,
    format_reward,
    grounding_reward,
    iou_reward,
)
from vrft.rewards.parsing import extract_answer, parse_detection_answer, parse_grounding_box

CHECKERS = {
    "classification": check_classification_solution,
    "detection": check_detection_solution,
    "grounding": check_grounding_solution,
}
PERFECT = {
    "classification": (accuracy_reward, 1.0),
    "detection": (iou_reward, 1.0),
    "grounding": (grounding_reward, 2.0),
}


@pytest.mark.parametrize("task", list(CHECKERS))
def test_schema_and_valid_solutions(task):
    dataset = make_synthetic_dataset(task, num_train=12, num_test=4, image_size=64)
    assert set(dataset) == {"train", "test"}
    assert (len(dataset["train"]), len(dataset["test"])) == (12, 4)
    train = dataset["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train.column_names == ["image", "problem", "solution", "category", "width", "height"]
    assert train[0]["image"].size == (64, 64) and train[0]["image"].mode == "RGB"
    solutions = train["solution"]
    for solution in solutions:
        CHECKERS[task](solution)
    # The ground truth, written as a completion, earns the full task and format rewards.
    completions = [f"<think>look</think><answer>{extract_answer(s)}</answer>" for s in solutions]
    reward, best = PERFECT[task]
    assert reward(completions, solutions) == [best] * len(solutions)
    assert format_reward(completions, solutions) == [1.0] * len(solutions)


def test_classification_prompt_and_small_label_space():
    train = make_synthetic_dataset("classification", 64, 0)["train"]
    assert train[0]["problem"].startswith("This is an image containing a shape. Please identify the shape")
    assert set(train["category"]) == set(SHAPES)
    assert all(
        s == f"<answer>{c}</answer>" for s, c in zip(train["solution"], train["category"], strict=True)
    )


def test_generation_is_deterministic_and_seeded():
    first = make_synthetic_dataset("detection", 8, 4, seed=3)
    again = make_synthetic_dataset("detection", 8, 4, seed=3)
    other = make_synthetic_dataset("detection", 8, 4, seed=4)
    assert first["train"]["solution"] == again["train"]["solution"]
    assert np.array_equal(np.asarray(first["train"][5]["image"]), np.asarray(again["train"][5]["image"]))
    assert first["train"]["solution"] != other["train"]["solution"]
    # The test split has its own generator: it does not move when the training set grows.
    assert make_synthetic_dataset("detection", 20, 4, seed=3)["test"]["solution"] == first["test"]["solution"]


def test_no_objects_rate():
    always = make_synthetic_dataset("detection", 16, 0, no_objects_rate=1.0)["train"]["solution"]
    never = make_synthetic_dataset("detection", 16, 0, no_objects_rate=0.0)["train"]["solution"]
    assert always == ["<answer>No Objects</answer>"] * 16  # at most 3 of 4 kinds are drawn, one is absent
    assert "<answer>No Objects</answer>" not in never


@pytest.mark.parametrize("kind", SHAPES)
def test_box_is_the_extent_of_the_drawn_pixels(kind):
    background = (250, 250, 250)
    image = np.asarray(draw_shapes([Shape(kind, "blue", (10, 20, 40, 50))], 64, background))
    ys, xs = np.nonzero((image != background).any(axis=-1))
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (10, 20, 40, 50)


def test_answers_point_at_the_named_shape_in_absolute_pixels():
    dataset = make_synthetic_dataset("grounding", 8, 0, image_size=96, coord_convention="absolute")["train"]
    for row in dataset:
        x1, y1, x2, y2 = (int(v) for v in parse_grounding_box(extract_answer(row["solution"])))
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        assert row["problem"].startswith(
            f"Output the bounding box in the image corresponding to the instruction: the {row['category']}"
        )
        pixels = np.asarray(row["image"])[y1:y2, x1:x2].reshape(-1, 3)
        assert (pixels == COLORS[row["category"].split()[0]]).all(axis=1).any()
    detection = make_synthetic_dataset("detection", 8, 0, image_size=96, coord_convention="qwen2vl")["train"]
    for solution in detection["solution"]:
        for box in parse_detection_answer(extract_answer(solution)):
            assert all(0 <= v <= 1000 for v in box.box)


def test_write_synthetic_dataset_round_trips(tmp_path):
    written = write_synthetic_dataset(tmp_path / "set", "grounding", num_train=4, num_test=0, seed=1)
    loaded = datasets.load_from_disk(str(tmp_path / "set"))
    assert list(loaded) == ["train"]
    assert loaded["train"]["solution"] == written["train"]["solution"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "segmentation"}, "not one of"),
        ({"num_train": 0}, "num_train >= 1"),
        ({"image_size": 16}, "at least 32"),
        ({"no_objects_rate": 1.5}, "in \\[0, 1\\]"),
        ({"coord_convention": "xywh"}, "coord_convention"),
    ],
)
def test_bad_arguments_are_named(options, message):
    arguments = {"task": "detection", "num_train": 2, "num_test": 0} | options
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(**arguments)
