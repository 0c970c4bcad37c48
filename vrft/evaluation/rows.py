"""The rows an evaluation decodes, read from a Visual-RFT split and checked before the first forward pass.

Visual-RFT's own data has only `image`, `problem` and `solution`. What a metric needs besides is derived
here, once, for every row: the detection category (a `category` column, else the name the prompt quotes
after "category", else the one class named in the solution's entries), the COCO image id (an `image_id`
column, else, or where it is null, a hash of the image's bytes, so one image asked about several categories
is one COCO image) and the class of a classification row (its ground-truth label). Rows that cannot be
evaluated are listed by row number before anything is decoded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from torch.utils.data import Dataset

from vrft.data.loading import check_problem, decode_image
from vrft.rewards.parsing import extract_answer

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
# Optional detection columns of rows built by vrft.data.build: the ground truth of the official evaluation.
TRUTH_COLUMNS = ("pixel_boxes", "crowd_boxes", "not_exhaustive")
# The reference prompt: "Detect all objects belonging to the category '{category}' in the image, ...".
_PROMPT_CATEGORY = re.compile(
    r"\bcategor(?:y|ies)\s*[:=]?\s*['\"‘“]([^'\"’”\n]{1,100})['\"’”]", re.IGNORECASE
)
# Solutions of other detection sets name the class in each entry: {'Position': [...], 'Category': 'dog'}.
_SOLUTION_CLASS = re.compile(
    r"['\"]?(?:category|label|class)['\"]?\s*:\s*['\"]([^'\"]{1,100})['\"]", re.IGNORECASE
)


def category_from_prompt(problem: str) -> str | None:
    """The category the reference prompt quotes after "category" (None if the prompt names none)."""
    match = _PROMPT_CATEGORY.search(problem or "")
    return match.group(1).strip() if match else None


def classes_in_solution(solution: str) -> set[str]:
    """Class names written inside the solution's detection entries (`'Category': 'dog'`)."""
    return {name.strip() for name in _SOLUTION_CLASS.findall(solution or "")}


def detection_category(row: dict) -> str:
    """The category a detection row asks about: its `category` column, prompt, or solution's one class.

    Raises `ValueError` saying which sources were tried when none gives exactly one category.
    """
    if row.get("category"):
        return str(row["category"])
    if (category := category_from_prompt(row.get("problem", ""))) is not None:
        return category
    classes = classes_in_solution(row.get("solution", ""))
    if len(classes) == 1:
        return classes.pop()
    found = f"the solution names {sorted(classes)}" if classes else "the solution names no class"
    raise ValueError(
        f"no detection category: no 'category' column, the prompt quotes no name after \"category\" and "
        f"{found}; add a 'category' column"
    )


def _is_box(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) for n in value)
    )


def check_truth_columns(row: dict) -> None:
    """Raise `ValueError` when a detection row's optional ground-truth columns (`vrft.data.build` writes them
    for the official COCO/LVIS evaluation) hold what the metric cannot read; absent or null, each is fine."""
    for column in ("pixel_boxes", "crowd_boxes"):
        boxes = row.get(column)
        if boxes is not None and not (isinstance(boxes, list | tuple) and all(map(_is_box, boxes))):
            raise ValueError(
                f"{column} {boxes!r}, not a list of [x1, y1, x2, y2] pixel boxes; fix the column or remove it"
            )
    flag = row.get("not_exhaustive")
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"not_exhaustive {flag!r}, not true or false; fix the column or remove it")


def image_content_id(image) -> str:
    """A COCO image id from the image's bytes (16 hex digits of SHA-1): equal images, one id."""
    data = image.get("bytes") if isinstance(image, dict) else None
    if not data:
        source = image.get("path") if isinstance(image, dict) else image
        try:
            data = Path(source).read_bytes()
        except (OSError, TypeError) as error:
            raise ValueError(f"image '{source}' could not be read ({error})") from None
    return hashlib.sha1(data).hexdigest()[:16]


@dataclass
class EvalRows:
    """The rows of one split an evaluation decodes, with what the metric needs derived per row.

    `columns[i]` adds to row `i` of `table`: `row_index`, and for detection `category` and `image_id`,
    for classification `category` (the class of the ground truth).
    """

    table: datasets.Dataset
    split: str
    columns: dict[int, dict] = field(default_factory=dict)  # kept row index -> derived columns
    bad: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason) of rows left out

    @property
    def indices(self) -> list[int]:
        return list(self.columns)


def prepare_rows(
    table: datasets.Dataset,
    split: str,
    task: str,
    check_solution: Callable[[str], None] | None = None,
    on_bad_row: str = "error",
    max_rows: int | None = None,
) -> EvalRows:
    """Check and complete the first `max_rows` rows of `table` for `task`'s metric; no model runs.

    Bad rows (unparseable solution; detection: no category, an `image_id` shared with an image of another
    size, unreadable `TRUTH_COLUMNS`; an image that cannot be decoded) raise one `ValueError` listing them by
    row number, or with `on_bad_row="skip"` are left out and reported in `EvalRows.bad`.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row='{on_bad_row}' is not one of: {', '.join(ON_BAD_ROW)}")
    count = len(table) if max_rows is None else min(max_rows, len(table))
    if count == 0:
        raise ValueError(f"split '{split}' is empty; choose a split with rows (split=...)")
    read = ("problem", "solution", "category", *TRUTH_COLUMNS)
    text = table.select_columns([c for c in read if c in table.column_names])
    images = table.select_columns(["image"])  # undecoded (bytes or a path): each is opened once here
    rows = EvalRows(table, split)
    sizes: dict[int, tuple[int, int]] = {}  # row index -> (width, height) of its decoded image
    for index in range(count):
        row = text[index]
        try:
            check_problem(row.get("problem"))
            if check_solution is not None:
                check_solution(row["solution"])
            # as training's data module does at setup: a bad file is named now, not in the batch that meets it
            sizes[index] = decode_image(images[index]["image"]).size
            rows.columns[index] = _derived(row, task, index)
        except ValueError as error:
            rows.bad.append((index, str(error)))
    if task == "detection" and rows.columns:
        _add_image_ids(table, rows)
        _check_image_sizes(rows, sizes)
    _report_bad(rows, on_bad_row)
    return rows


def _derived(row: dict, task: str, index: int) -> dict:
    derived = {"row_index": index}
    if task == "detection":
        derived["category"] = detection_category(row)
        check_truth_columns(row)
    elif task == "classification":
        derived["category"] = extract_answer(row["solution"]) or ""
    return derived


def _add_image_ids(table: datasets.Dataset, rows: EvalRows) -> None:
    if "image_id" in table.column_names:
        ids = table.select_columns(["image_id"])[: max(rows.columns) + 1]["image_id"]
        for index, derived in rows.columns.items():
            derived["image_id"] = ids[index]
    images = table.select_columns(["image"])
    for index, derived in rows.columns.items():
        # a row whose image_id is null (a JSON row without one) would share the id None with every other such
        # row, merging their images into one COCO image: it gets the content hash, as without the column
        if derived.get("image_id") is None:
            derived["image_id"] = image_content_id(images[index]["image"])


def _check_image_sizes(rows: EvalRows, sizes: dict[int, tuple[int, int]]) -> None:
    """Rows whose `image_id` is shared by images of another size become bad rows: COCO would take them for one
    image, and the metric would refuse them only after every row had been decoded."""
    first: dict[object, int] = {}  # image id -> the first row that has it
    for index, derived in list(rows.columns.items()):
        other = first.setdefault(derived["image_id"], index)
        if sizes[other] != sizes[index]:
            (w1, h1), (w2, h2) = sizes[other], sizes[index]
            rows.bad.append(
                (
                    index,
                    f"image_id {derived['image_id']!r} is also row {other}'s, whose image is {w1}x{h1}, not "
                    f"{w2}x{h2}; give each image its own image_id",
                )
            )
            del rows.columns[index]
    rows.bad.sort()


def _report_bad(rows: EvalRows, on_bad_row: str) -> None:
    if not rows.bad:
        return
    numbers = ", ".join(str(index) for index, _ in rows.bad[:50]) + (" ..." if len(rows.bad) > 50 else "")
    first = "; ".join(f"row {index}: {reason}" for index, reason in rows.bad[:3])
    if on_bad_row == "error" or not rows.columns:
        raise ValueError(
            f"{len(rows.bad)} bad row(s) in split '{rows.split}' (rows {numbers}); {first}. Fix the data, or "
            "set on_bad_row=skip to evaluate without them (they are counted in the report)"
        )
    log.warning(
        "skipping %d bad row(s) of split '%s' (on_bad_row=skip): rows %s", len(rows.bad), rows.split, numbers
    )


class EvalRowDataset(Dataset):
    """The rows at `indices` as dicts with a decoded RGB `image`, its `image_size` and the derived columns."""

    def __init__(self, rows: EvalRows, indices: list[int]):
        self.rows = rows
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        row = dict(self.rows.table[index]) | self.rows.columns[index]
        row["image"] = decode_image(row["image"])
        row["image_size"] = row["image"].size
        return row
