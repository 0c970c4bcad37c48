"""Task evaluators: the metric Visual-RFT reports, computed from greedy completions and dataset rows.

Each evaluator is a callable `(completions, rows) -> dict[str, float]` with one completion per row; the
task config picks it, and both the validation loop and `python -m vrft.evaluate` use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vrft.evaluation.metrics import BoxSet, classification_accuracy, detection_map, grounding_miou


class ClassificationEvaluator:
    """Accuracy with the accuracy reward's matching rule (`compat` and `classes` as the reward)."""

    name = "classification"

    def __init__(self, compat: bool = False, classes: Sequence[str] | None = None):
        self.compat = compat
        self.classes = list(classes) if classes is not None else None

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        solutions = [r["solution"] for r in rows]
        return {"accuracy": classification_accuracy(completions, solutions, self.compat, self.classes)}


class GroundingEvaluator:
    """Mean IoU of the first predicted box against the ground-truth box."""

    name = "grounding"

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        return {"miou": grounding_miou(completions, [r["solution"] for r in rows])}


class DetectionEvaluator:
    """COCO bbox mAP (IoU .50:.95 and .50) per category and averaged over the evaluated categories.

    Rows need a `category` column; the image id is the row's `image_id` (one image asked about several
    categories) or else its row index; the image size comes from the decoded image.

    Args:
        coord_convention: `qwen2vl` (0..1000 grid) or `absolute` (pixels, Qwen2.5-VL).
        categories: categories to average over; default every category in the rows.
    """

    name = "detection"

    def __init__(self, coord_convention: str = "qwen2vl", categories: Sequence[str] | None = None):
        self.coord_convention = coord_convention
        self.categories = list(categories) if categories else None

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> dict[str, float]:
        if rows and "category" not in rows[0]:
            raise ValueError(
                "detection evaluation needs a 'category' column naming the class each row asks about; build "
                "rows with vrft.data.builders.build_detection_rows or add the column"
            )
        predictions, truth = [], []
        for completion, row in zip(completions, rows, strict=True):
            image_id = row.get("image_id", row["row_index"])
            width, height = row["image_size"]
            predictions.append(BoxSet.from_answer(completion, image_id, row["category"], width, height))
            truth.append(BoxSet.from_answer(row["solution"], image_id, row["category"], width, height))
        categories = self.categories or sorted({row["category"] for row in rows})
        result = detection_map(predictions, truth, categories, self.coord_convention)
        metrics = {"map": result["map"], "map_50": result["map_50"]}
        for name, values in result["per_class"].items():
            if not math.isnan(values["map"]):
                metrics[f"map/{name}"] = values["map"]
        return metrics
