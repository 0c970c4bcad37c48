"""Synthetic Visual-RFT data: coloured shapes on a light background, in the schema of each task.

Small enough for a tiny model to learn on CPU: 4 shapes in 4 colours, one ``image_size`` square
image per row, boxes written in the model's convention. Deterministic given the seed: each split
draws from its own generator, so the test rows do not change when ``num_train`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image, ImageDraw

from vrft.data.prompts import classification_prompt, detection_prompt, grounding_prompt
from vrft.rewards.boxes import check_coord_convention, pixels_to_convention
from vrft.rewards.parsing import format_detection_answer, format_grounding_answer

TASKS = ("classification", "detection", "grounding")
SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
)  # no label contains another (the reward matches substrings)
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 190, 20)}
MIN_IMAGE_SIZE = 32
_SPLIT_INDEX = {"train": 0, "test": 1}
_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "problem": datasets.Value("string"),
        "solution": datasets.Value("string"),
        "category": datasets.Value(
            "string"
        ),  # class, queried category, or the referred object ("red square")
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
    }
)
_CLASSIFICATION_PROBLEM = classification_prompt(subject="shape", question="shape", answer_hint="shape name")
# What a classification row asks for: the shape's kind, or its colour (far easier for a tiny random-weight model).
CLASSIFY = ("shape", "color")
_COLOR_PROBLEM = classification_prompt(
    subject="shape", question="color of the shape", answer_hint="color name"
)


@dataclass(frozen=True)
class Shape:
    """One filled shape of a synthetic image."""

    kind: str  # one of SHAPES
    color: str  # one of COLORS
    box: tuple[int, int, int, int]  # pixel (x1, y1, x2, y2), end-exclusive; the shape touches all four sides


class _Row(NamedTuple):
    """One generated row; its image is drawn from ``shapes``."""

    shapes: list[Shape]
    problem: str
    solution: str
    category: str


# Each drawer fills the shape inside inclusive pixel corners (x1, y1, x2, y2).
def _draw_circle(canvas: ImageDraw.ImageDraw, corners: tuple, fill: tuple) -> None:
    canvas.ellipse(corners, fill=fill)


def _draw_square(canvas: ImageDraw.ImageDraw, corners: tuple, fill: tuple) -> None:
    canvas.rectangle(corners, fill=fill)


def _draw_triangle(canvas: ImageDraw.ImageDraw, corners: tuple, fill: tuple) -> None:
    x1, y1, x2, y2 = corners
    canvas.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=fill)


def _draw_diamond(canvas: ImageDraw.ImageDraw, corners: tuple, fill: tuple) -> None:
    x1, y1, x2, y2 = corners
    center_x, center_y = (x1 + x2) / 2, (y1 + y2) / 2
    canvas.polygon([(center_x, y1), (x2, center_y), (center_x, y2), (x1, center_y)], fill=fill)


_DRAW = {"circle": _draw_circle, "square": _draw_square, "triangle": _draw_triangle, "diamond": _draw_diamond}


def draw_shapes(shapes: list[Shape], image_size: int, background: tuple[int, int, int]) -> Image.Image:
    """An RGB ``image_size`` x ``image_size`` image with ``shapes`` drawn in order."""
    image = Image.new("RGB", (image_size, image_size), background)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        x1, y1, x2, y2 = shape.box
        # PIL includes the last pixel, so drawing to x2 - 1 fills exactly [x1, x2).
        _DRAW[shape.kind](canvas, (x1, y1, x2 - 1, y2 - 1), COLORS[shape.color])
    return image


def _square_in(rng: np.random.Generator, left: int, top: int, span: int, fill: tuple[float, float]) -> tuple:
    side = int(rng.integers(max(4, int(span * fill[0])), max(5, int(span * fill[1])) + 1))
    x, y = (int(v) for v in rng.integers(0, span - side + 1, size=2))
    return (left + x, top + y, left + x + side, top + y + side)


def _grid_boxes(rng: np.random.Generator, count: int, image_size: int) -> list[tuple]:
    # One shape per cell of a 2x2 grid: boxes never overlap, so every box is the shape's true extent.
    cell = image_size // 2
    cells = rng.choice(4, size=count, replace=False)
    return [_square_in(rng, int(c % 2) * cell, int(c // 2) * cell, cell, (0.45, 0.9)) for c in cells]


def _pick(rng: np.random.Generator, options: tuple | list) -> str:
    return options[int(rng.integers(len(options)))]


# Row makers share one signature so that the task picks one from a table (classification takes more).
def _classification_row(
    rng: np.random.Generator,
    image_size: int,
    coord_convention: str,
    no_objects_rate: float,
    classify: str = "shape",
    scale: tuple[float, float] = (0.3, 0.7),
) -> _Row:
    shape = Shape(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _square_in(rng, 0, 0, image_size, scale))
    if classify == "color":
        return _Row([shape], _COLOR_PROBLEM, f"<answer>{shape.color}</answer>", shape.color)
    return _Row([shape], _CLASSIFICATION_PROBLEM, f"<answer>{shape.kind}</answer>", shape.kind)


def _detection_row(
    rng: np.random.Generator, image_size: int, coord_convention: str, no_objects_rate: float
) -> _Row:
    boxes = _grid_boxes(rng, int(rng.integers(1, 4)), image_size)
    shapes = [Shape(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), box) for box in boxes]
    present = sorted({shape.kind for shape in shapes})
    absent = [kind for kind in SHAPES if kind not in present]
    category = _pick(rng, absent) if absent and rng.random() < no_objects_rate else _pick(rng, present)
    answer_boxes = [
        pixels_to_convention(shape.box, image_size, image_size, coord_convention)
        for shape in shapes
        if shape.kind == category
    ]
    return _Row(
        shapes, detection_prompt(category, coord_convention), format_detection_answer(answer_boxes), category
    )


def _grounding_row(
    rng: np.random.Generator, image_size: int, coord_convention: str, no_objects_rate: float
) -> _Row:
    # Distinct (colour, shape) pairs, so that "the red square" names exactly one object.
    pairs = [(color, kind) for color in COLORS for kind in SHAPES]
    boxes = _grid_boxes(rng, int(rng.integers(2, 4)), image_size)
    chosen = rng.choice(len(pairs), size=len(boxes), replace=False)
    shapes = [Shape(pairs[p][1], pairs[p][0], box) for p, box in zip(chosen, boxes, strict=True)]
    target = shapes[int(rng.integers(len(shapes)))]
    described = f"{target.color} {target.kind}"
    box = pixels_to_convention(target.box, image_size, image_size, coord_convention)
    return _Row(shapes, grounding_prompt(f"the {described}"), format_grounding_answer(box), described)


_ROW_MAKERS = {
    "classification": _classification_row,
    "detection": _detection_row,
    "grounding": _grounding_row,
}


def _split(
    task: str, num_rows: int, image_size: int, rng: np.random.Generator, **options
) -> datasets.Dataset:
    columns: dict[str, list] = {name: [] for name in _FEATURES}
    for _ in range(num_rows):
        background = tuple(int(v) for v in rng.integers(205, 256, size=3))
        row = _ROW_MAKERS[task](rng, image_size, **options)
        columns["image"].append(draw_shapes(row.shapes, image_size, background))
        columns["problem"].append(row.problem)
        columns["solution"].append(row.solution)
        columns["category"].append(row.category)
        columns["width"].append(image_size)
        columns["height"].append(image_size)
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


def make_synthetic_dataset(
    task: str,
    num_train: int,
    num_test: int,
    image_size: int = 112,
    seed: int = 0,
    coord_convention: str = "qwen2vl",
    no_objects_rate: float = 0.25,
    classify: str = "shape",
    min_scale: float = 0.3,
    max_scale: float = 0.7,
) -> datasets.DatasetDict:
    """Generate a Visual-RFT dataset of coloured shapes with splits ``train`` (and ``test`` if ``num_test``).

    Columns: ``image`` (PIL, ``datasets.Image``), ``problem`` (the Visual-RFT prompt of the task),
    ``solution`` (``<answer>...</answer>``), ``category``, ``width``, ``height``.

    - classification: one shape whose side spans ``min_scale``..``max_scale`` of the image; the label
      is its kind (circle, square, triangle, diamond), or with ``classify="color"`` its colour.
    - detection: 1-3 shapes; each row asks for one kind. With probability ``no_objects_rate`` it
      asks for a kind that is absent, whose answer is "No Objects".
    - grounding: 2-3 shapes of distinct colour and kind; the instruction names one ("the red
      square") and the answer is its box as ``(x1,y1),(x2,y2)``.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if num_train < 1 or num_test < 0:
        raise ValueError(f"num_train={num_train}, num_test={num_test}: need num_train >= 1 and num_test >= 0")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is too small to draw shapes; use at least {MIN_IMAGE_SIZE}"
        )
    if not 0.0 <= no_objects_rate <= 1.0:
        raise ValueError(f"no_objects_rate={no_objects_rate} is not a probability; use a value in [0, 1]")
    if classify not in CLASSIFY:
        raise ValueError(f"classify={classify!r} is not one of {CLASSIFY}")
    if not 0.0 < min_scale <= max_scale <= 1.0:
        raise ValueError(
            f"min_scale={min_scale}, max_scale={max_scale}: need 0 < min_scale <= max_scale <= 1 "
            "(fractions of the image side)"
        )
    check_coord_convention(coord_convention)
    options = dict(coord_convention=coord_convention, no_objects_rate=no_objects_rate)
    if task == "classification":
        options.update(classify=classify, scale=(min_scale, max_scale))
    sizes = {"train": num_train, "test": num_test}
    return datasets.DatasetDict(
        {
            split: _split(
                task,
                count,
                image_size,
                np.random.default_rng([seed, _SPLIT_INDEX[split]]),
                **options,
            )
            for split, count in sizes.items()
            if count > 0
        }
    )


def write_synthetic_dataset(
    path: str | Path, task: str, num_train: int, num_test: int, **options
) -> datasets.DatasetDict:
    """``make_synthetic_dataset`` and ``save_to_disk(path)``; returns the dataset."""
    dataset = make_synthetic_dataset(task, num_train, num_test, **options)
    dataset.save_to_disk(str(path))
    return dataset
