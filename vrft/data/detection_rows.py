"""Visual-RFT detection rows from a COCO or LVIS annotation file: one per image and category.

Boxes are written as integers in the model's convention: "qwen2vl" (0..1000 grid) or "absolute" (pixels).
Rows also carry what the official COCO/LVIS evaluation reads instead of the rounded solution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from vrft.data.annotations import read_coco
from vrft.data.k_shot import nested_sample
from vrft.data.prompts import detection_prompt
from vrft.data.rows import missing_files, to_dataset
from vrft.rewards.boxes import check_coord_convention, pixels_to_convention
from vrft.rewards.parsing import format_detection_answer


def image_path(image: dict, image_dir: Path) -> Path:
    """Where the file of a COCO or LVIS ``images`` entry lies in ``image_dir``."""
    # COCO names the file; LVIS only gives coco_url, whose last part is the file name.
    name = image.get("file_name") or str(image.get("coco_url", "")).rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"image {image.get('id')!r} has neither file_name nor coco_url; add its file name")
    return image_dir / name


def known_absent(image: dict, category_id: int) -> bool:
    """Whether a "No Objects" answer is known right for the category in this image."""
    # LVIS is federated: a category is known to be absent only where the image lists it as negative.
    return category_id in image.get("neg_category_ids", [category_id])


def build_detection_rows(
    annotation_json: str | Path,
    image_dir: str | Path,
    categories: Sequence[str] | None = None,
    shots: int | None = None,
    seed: int = 0,
    coord_convention: str = "qwen2vl",
    no_objects: int = 0,
    on_missing: str = "error",
    split: str = "train",
) -> datasets.DatasetDict:
    """Visual-RFT detection rows (one per image and category) from a COCO or LVIS annotation file.

    Args:
        annotation_json: COCO-format JSON (``images``, ``annotations`` with xywh pixel ``bbox``,
            ``categories``); LVIS files work too (file names from ``coco_url``).
        image_dir: folder holding the images named in the file.
        categories: category names to keep, in order; None keeps all.
        shots: images sampled per category (k-shot, seeded); None keeps every image with a box.
        no_objects: also add this many "No Objects" rows per category, from images where the
            category is absent (no box or crowd region; for LVIS: listed in ``neg_category_ids``); 0 adds
            none.
        on_missing: "error" stops on missing image files; "skip" drops their rows.

    Solutions hold the non-crowd boxes. Rows carry ``category``, ``image_id``, ``width`` and ``height``,
    and for the official COCO/LVIS evaluation (``DetectionEvaluator``) ``pixel_boxes`` (the file's boxes,
    unrounded), ``crowd_boxes`` (its ``iscrowd`` regions) and ``not_exhaustive`` (LVIS
    ``not_exhaustive_category_ids``).
    """
    check_coord_convention(coord_convention)
    if shots is not None and shots < 1:
        raise ValueError(
            f"shots={shots} must be at least 1 (images per class); leave it out to keep every image"
        )
    if no_objects < 0:
        raise ValueError(f"no_objects={no_objects} must be 0 or more ('No Objects' rows per class)")
    coco = read_coco(annotation_json)
    ids_by_name = {category["name"]: category["id"] for category in coco.get("categories", [])}
    # `fire_hydrant` for `fire hydrant`: the spelling a comma-separated command-line list invites.
    underscored = {name.replace(" ", "_"): name for name in ids_by_name}
    chosen = list(ids_by_name) if categories is None else [underscored.get(n, n) for n in categories]
    if unknown := [name for name in chosen if name not in ids_by_name]:
        available = ", ".join(sorted(ids_by_name)[:50]) + (" ..." if len(ids_by_name) > 50 else "")
        raise ValueError(f"categories {unknown} are not in '{annotation_json}'; available: {available}")
    images = {image["id"]: image for image in coco.get("images", [])}
    annotated = annotated_boxes(coco, images, {ids_by_name[name] for name in chosen}, coord_convention)
    boxes = {pair: truth for pair, truth in annotated.items() if truth.boxes}
    used = sorted(images) if no_objects else sorted({image_id for image_id, _ in boxes})
    paths = {image_id: image_path(images[image_id], Path(image_dir)) for image_id in used}
    missing = missing_files(paths, on_missing, annotation_json)
    present = [image_id for image_id in paths if image_id not in missing]
    rows = []
    for name in chosen:
        category_id = ids_by_name[name]
        positives = [i for i in present if (i, category_id) in boxes]
        if shots is not None and shots > len(positives):
            raise ValueError(
                f"category '{name}' has {len(positives)} images with boxes, fewer than shots={shots}; "
                f"lower shots to {len(positives)} or drop '{name}' from categories"
            )
        for i in nested_sample(positives, len(positives) if shots is None else shots, seed, name):
            rows.append(
                detection_row(
                    images[i], paths[i], category_id, name, boxes[(i, category_id)], coord_convention
                )
            )
        # not an image with a crowd region or a box too thin for the grid: "No Objects" would be a wrong label
        negatives = [
            i for i in present if (i, category_id) not in annotated and known_absent(images[i], category_id)
        ]
        if no_objects > len(negatives):
            raise ValueError(
                f"category '{name}' is absent from only {len(negatives)} images, fewer than "
                f"no_objects={no_objects}; lower no_objects to {len(negatives)}"
            )
        for i in nested_sample(negatives, no_objects, seed, f"{name}:absent"):
            rows.append(
                detection_row(images[i], paths[i], category_id, name, AnnotatedBoxes(), coord_convention)
            )
    if not rows:
        raise ValueError(
            f"no detection rows: none of {chosen} has a box in an image found in '{image_dir}'; "
            "check the categories and the image folder"
        )
    return to_dataset(rows, split)


@dataclass
class AnnotatedBoxes:
    """What an annotation file says about one category in one image.

    The solution holds ``boxes``, rounded to the model's convention; the official COCO/LVIS evaluation
    compares with ``pixel_boxes`` and ignores detections on ``crowd_boxes``, so rows carry both.
    """

    boxes: list[list[int]] = field(default_factory=list)  # [N, 4] xyxy in the convention: the solution's
    pixel_boxes: list[list[float]] = field(default_factory=list)  # [M, 4] xyxy pixels, M >= N (none vanish)
    crowd_boxes: list[list[float]] = field(default_factory=list)  # [C, 4] xyxy pixels of iscrowd regions


def annotated_boxes(
    coco: dict, images: dict, wanted: set, coord_convention: str
) -> dict[tuple, AnnotatedBoxes]:
    """``{(image_id, category_id): AnnotatedBoxes}`` for the wanted categories' annotations."""
    annotated: dict[tuple, AnnotatedBoxes] = {}
    for annotation in coco.get("annotations", []):
        if annotation["category_id"] not in wanted:
            continue
        image = images.get(annotation["image_id"])
        if image is None:
            raise ValueError(
                f"annotation {annotation.get('id')!r} refers to image {annotation['image_id']!r}, which the "
                "file does not list under 'images'; fix the annotation file"
            )
        x, y, w, h = (float(value) for value in annotation["bbox"])
        pixels = [x, y, x + w, y + h]
        entry = annotated.setdefault((image["id"], annotation["category_id"]), AnnotatedBoxes())
        if annotation.get("iscrowd", 0):
            entry.crowd_boxes.append(pixels)
            continue
        entry.pixel_boxes.append(pixels)
        box = pixels_to_convention(pixels, image["width"], image["height"], coord_convention)
        if box[2] > box[0] and box[3] > box[1]:  # boxes thinner than one grid step vanish when rounded
            entry.boxes.append(box)
    return annotated


def _not_exhaustive(image: dict, category_id: int) -> bool:
    # LVIS: the category is in the image but not every instance has a box; unmatched detections are ignored.
    return category_id in image.get("not_exhaustive_category_ids", [])


def detection_row(
    image: dict, path: Path, category_id: int, category: str, truth: AnnotatedBoxes, coord_convention: str
) -> dict:
    """The row asking about ``category`` in ``image``: its solution and evaluation columns come from ``truth``."""
    return {
        "image": str(path),
        "problem": detection_prompt(category, coord_convention),
        "solution": format_detection_answer(truth.boxes),
        "category": category,
        "image_id": image["id"],
        "width": image["width"],
        "height": image["height"],
        # what `DetectionEvaluator` gives the official evaluation instead of the solution's rounded boxes
        "pixel_boxes": truth.pixel_boxes,
        "crowd_boxes": truth.crowd_boxes,
        "not_exhaustive": _not_exhaustive(image, category_id),
    }
