"""Detection evaluation splits as Visual-RFT measures them: every (image, category) pair, absent ones included.

The paper's few-shot detection numbers are COCO bbox mAP over a fixed set of categories; asking about a
category only in images that contain it would never count a false positive. So every image is asked about
every chosen category, and where the category is absent the truth is "No Objects": boxes answered there
are false positives and cost mAP. LVIS is annotated federatedly: an image is asked about a category only
where the file says it is present (it has a box) or absent (`neg_category_ids`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import datasets

from vrft.data.annotations import read_coco
from vrft.data.detection_rows import AnnotatedBoxes, annotated_boxes, detection_row, image_path, known_absent
from vrft.data.rows import missing_files, to_dataset
from vrft.rewards.boxes import check_coord_convention

# The category settings the paper reports: COCO few-shot (8 classes) and LVIS rare (6 classes), as listed
# in the reference's evaluation instructions.
CATEGORY_SETS = {
    "coco-8": ["bus", "train", "fire hydrant", "stop sign", "cat", "dog", "bed", "toilet"],
    "lvis-rare": ["horse_buggy", "die", "kitchen_table", "omelet", "papaya", "stepladder"],
}


def category_list(spec: str | Sequence[str] | None) -> list[str] | None:
    """Category names from a named set (`coco-8`, `lvis-rare`), a comma-separated string or a list."""
    if spec is None or not isinstance(spec, str):
        return None if spec is None else list(spec)
    if spec in CATEGORY_SETS:
        return list(CATEGORY_SETS[spec])
    return [name.strip() for name in spec.split(",") if name.strip()]


def build_detection_eval_rows(
    annotation_json: str | Path,
    image_dir: str | Path,
    categories: str | Sequence[str] | None = "coco-8",
    max_images: int | None = None,
    seed: int = 0,
    coord_convention: str = "qwen2vl",
    on_missing: str = "error",
    split: str = "test",
) -> datasets.DatasetDict:
    """One Visual-RFT detection row per (image, category), "No Objects" where the category is absent.

    Args:
        annotation_json: COCO or LVIS annotation file (e.g. `instances_val2017.json`, `lvis_v1_val.json`).
        image_dir: folder holding its images.
        categories: `coco-8`, `lvis-rare`, comma-separated names, a list, or None for every category.
        max_images: evaluate a seeded sample of this many images (None: all); the same sample for every
            category, so each sampled image is asked about each of them.
        on_missing: "error" stops on missing image files; "skip" drops their rows.

    Rows carry `category`, `image_id`, `width` and `height` besides `image`, `problem`, `solution`, and what
    the official COCO/LVIS evaluation reads: `pixel_boxes` (the file's boxes; the solution rounds them to the
    model's grid), `crowd_boxes` (COCO `iscrowd` regions: detections on them are ignored) and
    `not_exhaustive` (LVIS `not_exhaustive_category_ids`: detections matching no box are ignored).
    """
    check_coord_convention(coord_convention)
    if max_images is not None and max_images < 1:
        raise ValueError(
            f"max_images={max_images} must be at least 1 (images sampled); leave it out to keep every image"
        )
    coco = read_coco(annotation_json)
    ids_by_name = {category["name"]: category["id"] for category in coco.get("categories", [])}
    # `fire_hydrant` for `fire hydrant`, as `build_detection_rows` reads it (the training set's command line)
    underscored = {name.replace(" ", "_"): name for name in ids_by_name}
    chosen = [underscored.get(name, name) for name in category_list(categories) or list(ids_by_name)]
    if unknown := [name for name in chosen if name not in ids_by_name]:
        available = ", ".join(sorted(ids_by_name)[:50]) + (" ..." if len(ids_by_name) > 50 else "")
        raise ValueError(
            f"categories {unknown} are not in '{annotation_json}'; available: {available} "
            f"(named sets: {', '.join(CATEGORY_SETS)})"
        )
    images = {image["id"]: image for image in coco.get("images", [])}
    annotated = annotated_boxes(coco, images, {ids_by_name[n] for n in chosen}, coord_convention)
    image_ids = sorted(images)
    if max_images is not None and max_images < len(image_ids):
        image_ids = sorted(random.Random(seed).sample(image_ids, max_images))
    paths = {i: image_path(images[i], Path(image_dir)) for i in image_ids}
    missing = missing_files(paths, on_missing, annotation_json)
    rows = []
    for i in (i for i in image_ids if i not in missing):
        for name in chosen:
            category_id = ids_by_name[name]
            truth = annotated.get((i, category_id), AnnotatedBoxes())
            # present: a box, even one too thin for the grid (the official evaluation still counts it)
            if truth.pixel_boxes or known_absent(images[i], category_id):
                rows.append(detection_row(images[i], paths[i], category_id, name, truth, coord_convention))
    if not rows:
        raise ValueError(f"no evaluation rows: no image of '{annotation_json}' was found in '{image_dir}'")
    return to_dataset(rows, split)
