"""Detection mAP as the official COCO and LVIS evaluations compute it (pycocotools' COCOeval).

Ground truth and answers come as one `BoxSet` per (image, category) row, the way Visual-RFT asks; crowd
regions and LVIS's not-exhaustively-annotated categories are handled as those evaluations do.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vrft.rewards.boxes import Box, check_coord_convention, convention_to_pixels, normalize_box
from vrft.rewards.parsing import parse_detection_answer, read_answer


@dataclass(frozen=True)
class BoxSet:
    """Boxes of one category in one image: a ground-truth row or the model's answer to it.

    Visual-RFT asks one question per (image, category), so both predictions and ground truth come
    as one ``BoxSet`` per row; a ground-truth set with no boxes ("No Objects") still registers the
    image, so that false positives on it are counted.
    """

    image_id: int | str
    category: str
    width: int  # image width in pixels; turns 0..1000 coordinates into pixels
    height: int  # image height in pixels
    boxes: Sequence[Sequence[float]] = ()  # [N, 4] (x1, y1, x2, y2), the task's convention or in_pixels
    scores: Sequence[float] | None = None  # [N] model confidences in [0, 1]; None (ground truth) means 1.0
    # Ground truth only. The solution's boxes are rounded to the 0..1000 grid; the annotation file's exact
    # pixels are what the official evaluation compares with.
    in_pixels: bool = False  # `boxes` are pixels whatever the task's convention
    crowd_boxes: Sequence[Sequence[float]] = ()  # [C, 4] (x1, y1, x2, y2) pixels of COCO iscrowd regions
    exhaustive: bool = True  # False: LVIS lists the category in not_exhaustive_category_ids for this image

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"image {self.image_id!r} has size {self.width}x{self.height}; pass its pixel size"
            )
        for name, boxes in (("boxes", self.boxes), ("crowd_boxes", self.crowd_boxes)):
            if any(len(box) != 4 for box in boxes):
                raise ValueError(
                    f"{name} of image {self.image_id!r} must be [x1, y1, x2, y2], got {list(boxes)}"
                )
        if self.scores is not None and len(self.scores) != len(self.boxes):
            raise ValueError(
                f"image {self.image_id!r} has {len(self.boxes)} boxes but {len(self.scores)} scores; "
                "give one score per box"
            )

    @classmethod
    def from_answer(
        cls, text: str, image_id: int | str, category: str, width: int, height: int, compat: bool = False
    ) -> BoxSet:
        """Read a completion or solution (``<answer>[{'Position': ..., 'Confidence': ...}]</answer>``).

        Unreadable answers give no boxes, as does "No Objects". Confidences become the scores.
        """
        answer = read_answer(text, compat, allow_unclosed=True)
        detections = (parse_detection_answer(answer, None, None) if answer is not None else None) or []
        return cls(
            image_id,
            category,
            width,
            height,
            boxes=[detection.box for detection in detections],
            scores=[detection.confidence for detection in detections],
        )


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def _pixel_boxes(box_set: BoxSet, convention: str) -> list[Box]:
    """The boxes of ``box_set`` as pixel xyxy: [N, 4]."""
    convention = "absolute" if box_set.in_pixels else convention
    return [
        convention_to_pixels(normalize_box(box), box_set.width, box_set.height, convention)
        for box in box_set.boxes
    ]


def _covering(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every box of ``boxes``."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


class _Annotations:
    """COCO annotation dicts, numbered from 1 (COCOeval treats id 0 as "unmatched")."""

    def __init__(self, image_ids: dict, category_ids: dict):
        self.image_ids, self.category_ids, self.entries = image_ids, category_ids, []

    def add(self, box_set: BoxSet, box: Box, score: float = 1.0, crowd: bool = False) -> None:
        x1, y1, x2, y2 = box
        self.entries.append(
            {
                "id": len(self.entries) + 1,
                "image_id": self.image_ids[box_set.image_id],
                "category_id": self.category_ids[box_set.category],
                "bbox": [x1, y1, x2 - x1, y2 - y1],  # COCO boxes are absolute xywh
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(crowd),
                "score": float(score),
            }
        )


def _detection_annotations(
    predictions: Sequence[BoxSet], image_ids: dict, category_ids: dict, convention: str
) -> tuple[list[dict], dict[tuple, list[Box]]]:
    """The detections as COCO annotations, and their pixel boxes by (image id, category)."""
    annotations = _Annotations(image_ids, category_ids)
    pixels: dict[tuple, list[Box]] = {}
    for box_set in predictions:
        if box_set.category not in category_ids:
            continue
        scores = box_set.scores if box_set.scores is not None else [1.0] * len(box_set.boxes)
        boxes = _pixel_boxes(box_set, convention)
        pixels.setdefault((box_set.image_id, box_set.category), []).extend(boxes)
        for box, score in zip(boxes, scores, strict=True):
            annotations.add(box_set, box, score)
    return annotations.entries, pixels


def _truth_annotations(
    truth: Sequence[BoxSet],
    detected: dict[tuple, list[Box]],
    image_ids: dict,
    category_ids: dict,
    convention: str,
) -> list[dict]:
    """The ground truth as COCO annotations, crowd regions as ``iscrowd=1`` (detections on them are ignored).

    LVIS ignores the detections that match no box where the category is not exhaustively annotated. COCOeval
    does the same given one crowd region holding the image and every detection: a detection matches a crowd
    region only when no regular box is left for it at that IoU threshold (``evaluateImg`` tries regular boxes
    first), and a crowd region's IoU is the detection's share inside it, here 1.
    """
    annotations = _Annotations(image_ids, category_ids)
    for box_set in truth:
        if box_set.category not in category_ids:
            continue
        for box in _pixel_boxes(box_set, convention):
            annotations.add(box_set, box)
        for box in box_set.crowd_boxes:
            annotations.add(box_set, normalize_box(box), crowd=True)
        if not box_set.exhaustive:
            image = (0.0, 0.0, float(box_set.width), float(box_set.height))
            inside = [image, *detected.get((box_set.image_id, box_set.category), [])]
            annotations.add(box_set, _covering(inside), crowd=True)
    return annotations.entries


def detection_map(
    predictions: Sequence[BoxSet],
    ground_truth: Sequence[BoxSet],
    categories: Sequence[str],
    coord_convention: str = "qwen2vl",
) -> dict[str, Any]:
    """COCO bbox mAP with the official pycocotools evaluation, per class and averaged.

    Boxes are converted from ``coord_convention`` ("qwen2vl": 0..1000 grid, "absolute": pixels)
    to absolute xywh with each image's size; the score is the model's confidence. Only
    ``categories`` are evaluated; sets of other categories are ignored. Images are the union of
    those named in ``ground_truth`` and ``predictions``.

    As the official COCO and LVIS evaluations: ground truth given ``in_pixels`` is compared as it is (not
    rounded to the grid), detections matching a ``crowd_boxes`` region are ignored, not false positives, and
    where a set is not ``exhaustive`` the detections that match no box are ignored.

    Returns ``{"map": mAP@[.50:.95], "map_50": mAP@.50, "per_class": {name: {"map", "map_50"}},
    "num_classes": classes averaged}``. A class with no ground-truth box has no defined AP: its
    per-class values are NaN and it is left out of the averages; when no class has a box the
    averages are NaN too.
    """
    check_coord_convention(coord_convention)
    sizes: dict[int | str, tuple[int, int]] = {}
    for box_set in [*ground_truth, *predictions]:
        size = sizes.setdefault(box_set.image_id, (box_set.width, box_set.height))
        if size != (box_set.width, box_set.height):
            raise ValueError(
                f"image {box_set.image_id!r} is given as {size[0]}x{size[1]} and as "
                f"{box_set.width}x{box_set.height}; every row of one image needs the same width and height"
            )
    image_ids = {image_id: index + 1 for index, image_id in enumerate(sizes)}
    category_ids = {name: index + 1 for index, name in enumerate(dict.fromkeys(categories))}
    images = [{"id": image_ids[i], "width": w, "height": h} for i, (w, h) in sizes.items()]
    coco_categories = [{"id": cid, "name": name} for name, cid in category_ids.items()]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every call
        detected, pixels = _detection_annotations(predictions, image_ids, category_ids, coord_convention)
        truth = _coco(
            images,
            coco_categories,
            _truth_annotations(ground_truth, pixels, image_ids, category_ids, coord_convention),
        )
        detections = _coco(images, coco_categories, detected)
        evaluator = COCOeval(truth, detections, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids.values())
        evaluator.params.catIds = sorted(category_ids.values())
        evaluator.evaluate()
        evaluator.accumulate()
    # [T IoU thresholds, R recall thresholds, K classes, A area ranges ("all" first), M max-dets (100 last)];
    # -1 marks "no ground truth", as in COCOeval.summarize.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for index, name in enumerate(category_ids):
        curve = precision[:, :, index]
        defined = bool((curve > -1).any())
        per_class[name] = {
            "map": float(np.mean(curve)) if defined else math.nan,
            "map_50": float(np.mean(curve[0])) if defined else math.nan,
        }
    evaluated = [values for values in per_class.values() if not math.isnan(values["map"])]
    return {
        "map": float(np.mean([v["map"] for v in evaluated])) if evaluated else math.nan,
        "map_50": float(np.mean([v["map_50"] for v in evaluated])) if evaluated else math.nan,
        "per_class": per_class,
        "num_classes": len(evaluated),
    }
