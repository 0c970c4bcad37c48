"""Task evaluators: the metric Visual-RFT reports, computed from greedy completions and dataset rows.

Each evaluator is a callable `(completions, rows) -> dict[str, float]` with one completion per row, and
`answer(completion)` gives the parsed answer that `predictions.jsonl` records, and `check_rows(rows, split)`
refuses settings the rows cannot meet before `python -m vrft.evaluate` decodes any; the task config picks
it, and both the validation loop and `python -m vrft.evaluate` use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from vrft.data.eval_splits import category_list
from vrft.evaluation.answer_metrics import classification_accuracy, grounding_giou, grounding_miou
from vrft.evaluation.mean_ap import BoxSet, detection_map
from vrft.evaluation.rows import check_truth_columns, detection_category
from vrft.rewards.classification import check_classes
from vrft.rewards.parsing import extract_answer, parse_detection_answer, parse_grounding_box, read_answer


class ClassificationEvaluator:
    """Accuracy with the accuracy reward's matching rule (`compat` and `classes` as the reward), overall and
    per class.

    The class of a row is its ground-truth label (the solution's `<answer>`); `accuracy/<label>` is the
    accuracy over that class's rows. The known classes are `classes` plus every label of the rows, so an
    answer naming two classes is wrong in the per-class figures too.
    """

    name = "classification"

    def __init__(self, compat: bool = False, classes: Sequence[str] | None = None):
        self.compat = compat
        self.classes = check_classes(classes)

    def check_rows(self, rows: Sequence[dict], split: str) -> None:
        """Nothing to check before decoding: every row has a label (its solution was checked)."""

    def answer(self, completion: str) -> str | None:
        """The answer text the reward compares (None when there is none)."""
        return read_answer(completion, self.compat)

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        solutions = [r["solution"] for r in rows]
        metrics = {"accuracy": classification_accuracy(completions, solutions, self.compat, self.classes)}
        by_class: dict[str, list[int]] = {}
        for index, solution in enumerate(solutions):
            by_class.setdefault(extract_answer(solution) or "", []).append(index)
        if len(by_class) > 1:
            # Every label of the rows stays known inside one class's rows: "red blue" is wrong for "red".
            known = [*(self.classes or ()), *(label for label in by_class if label)]
            for label, indices in sorted(by_class.items()):
                picked = [completions[i] for i in indices]
                metrics[f"accuracy/{label}"] = classification_accuracy(
                    picked, [solutions[i] for i in indices], self.compat, known
                )
        return metrics


class GroundingEvaluator:
    """Mean IoU and mean generalised IoU (the reward's GIoU) of the first predicted box against the truth."""

    name = "grounding"

    def check_rows(self, rows: Sequence[dict], split: str) -> None:
        """Nothing to check before decoding: every row has a box (its solution was checked)."""

    def answer(self, completion: str) -> list[float] | None:
        """The first box of the answer, or None when there is none."""
        text = read_answer(completion, False, allow_unclosed=True)
        box = parse_grounding_box(text) if text is not None else None
        return list(box) if box is not None else None

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        solutions = [r["solution"] for r in rows]
        return {
            "miou": grounding_miou(completions, solutions),
            "giou": grounding_giou(completions, solutions),
        }


class DetectionEvaluator:
    """COCO bbox mAP (IoU .50:.95 and .50) per category and averaged over the evaluated categories.

    The category of a row is its `category` column, else the one its prompt names (see
    `vrft.evaluation.rows.detection_category`); the image id is the row's `image_id` (one image asked
    about several categories) or, where it has none or a null, its row index; the image size comes from the
    decoded image. The ground truth is the solution's boxes, or where the row has them (rows built by
    `vrft.data.build`) what the official COCO/LVIS evaluation reads: the annotation file's exact
    `pixel_boxes`, its `crowd_boxes` and the LVIS `not_exhaustive` flag (see `BoxSet`).

    Args:
        coord_convention: `qwen2vl` (0..1000 grid) or `absolute` (pixels, Qwen2.5-VL).
        categories: categories to average over; default every category in the rows. One string is a
            comma-separated list or a named set (`coco-8`), as `vrft.data.build --categories` takes (`categories=cat` is `[cat]`, not
            the letters c, a, t).
    """

    name = "detection"

    def __init__(self, coord_convention: str = "qwen2vl", categories: Sequence[str] | str | None = None):
        self.coord_convention = coord_convention
        categories = category_list(categories)  # one string: a comma list or a named set, as vrft.data.build
        self.categories = [str(name) for name in categories] if categories else None

    def check_rows(self, rows: Sequence[dict], split: str) -> None:
        """Raise `ValueError` before decoding when a row asks about no category or holds unreadable
        ground-truth columns (`vrft.evaluation.rows.check_truth_columns`; the metric would stop on either),
        or when `categories` names one that no row asks about: its AP is undefined, so a misspelt name would
        leave it out of the average (or make the average NaN) unnoticed. `vrft.evaluate` passes rows whose
        category is derived already; training passes its validation split's rows as they are on disk."""
        asked, missing = set(), []
        for number, row in enumerate(rows):
            try:
                asked.add(detection_category(row))
                check_truth_columns(row)
            except ValueError as error:
                missing.append((row.get("row_index", number), str(error)))
        if missing:
            listed = ", ".join(str(index) for index, _ in missing[:20]) + (
                " ..." if len(missing) > 20 else ""
            )
            raise ValueError(f"split '{split}': {len(missing)} row(s) (rows {listed}) have {missing[0][1]}")
        unknown = [name for name in self.categories or () if name not in asked]
        if unknown:
            raise ValueError(
                f"task.evaluator.categories names {unknown}, which no row of split '{split}' asks about (rows ask "
                f"about {sorted(asked)}); fix the names, or categories=null to average over every category"
            )

    def answer(self, completion: str) -> list[dict] | None:
        """The boxes and confidences read from the answer ([] for "No Objects", None when unreadable)."""
        text = read_answer(completion, False, allow_unclosed=True)
        detections = parse_detection_answer(text) if text is not None else None
        if detections is None:
            return None
        return [{"box": list(d.box), "confidence": d.confidence} for d in detections]

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        predictions, truth, categories = [], [], []
        for completion, row in zip(completions, rows, strict=True):
            category = detection_category(row)
            image_id = row.get("image_id")
            if (
                image_id is None
            ):  # no column, or a null in it (training's validation rows): one image per row,
                image_id = f"row {row['row_index']}"  # named apart from the column's own ids
            width, height = row["image_size"]
            predictions.append(BoxSet.from_answer(completion, image_id, category, width, height))
            truth.append(_truth(row, image_id, category, width, height))
            categories.append(category)
        result = detection_map(
            predictions, truth, self.categories or sorted(set(categories)), self.coord_convention
        )
        metrics = {"map": result["map"], "map_50": result["map_50"]}
        for name, values in result["per_class"].items():
            if not math.isnan(values["map"]):
                metrics[f"map/{name}"] = values["map"]
                metrics[f"map_50/{name}"] = values["map_50"]
        return metrics


def _truth(row: dict, image_id: int | str, category: str, width: int, height: int) -> BoxSet:
    """The ground truth of a detection row; a column the row lacks (or holds null in) leaves the default."""
    truth = BoxSet.from_answer(row["solution"], image_id, category, width, height)
    if row.get("pixel_boxes") is not None:  # the solution's boxes are these, rounded to the grid
        truth = replace(truth, boxes=row["pixel_boxes"], scores=None, in_pixels=True)
    return replace(truth, crowd_boxes=row.get("crowd_boxes") or (), exhaustive=not row.get("not_exhaustive"))
