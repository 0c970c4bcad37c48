"""Reading a COCO- or LVIS-format annotation file, checked before any row is built from it.

Files exported by labelling tools or written by hand miss fields that COCO's own files always have (an image's
`width`, an annotation's `bbox`); the builders would stop on them with a KeyError or TypeError from deep inside.
Here the first bad entry of each kind is named, with its place in the file and the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_coco(path: str | Path) -> dict:
    """The parsed annotation file at `path`, with `images`, `categories` and `annotations` checked.

    Raises `ValueError` naming the first entry that lacks a field the builders read or holds a value they
    cannot use: an image's `id` and positive `width`/`height`, a category's `id` and string `name`, an
    annotation's `image_id`, `category_id` and `bbox` of four finite numbers.
    """
    with open(path) as file:
        coco = json.load(file)
    if not isinstance(coco, dict):
        raise ValueError(
            f"'{path}' holds a {type(coco).__name__}; expected a COCO-format object with images, annotations "
            "and categories"
        )
    for key, check in (
        ("images", _image_problem),
        ("categories", _category_problem),
        ("annotations", _box_problem),
    ):
        entries = coco.get(key, [])
        if not isinstance(entries, list):
            raise ValueError(f"'{path}': {key} is a {type(entries).__name__}, not a list of entries")
        for index, entry in enumerate(entries):
            problem = check(entry) if isinstance(entry, dict) else f"is {entry!r}, not an object"
            if problem:
                raise ValueError(
                    f"'{path}': {key}[{index}] {problem}; fix the entry (or export the file again in COCO format)"
                )
    return coco


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _missing(entry: dict, keys: tuple[str, ...]) -> str | None:
    absent = [key for key in keys if key not in entry]
    return f"(id {entry.get('id')!r}) has no {' or '.join(absent)}" if absent else None


def _image_problem(image: dict) -> str | None:
    if problem := _missing(image, ("id", "width", "height")):
        return problem
    if not all(_is_number(image[key]) and image[key] > 0 for key in ("width", "height")):
        return f"(id {image['id']!r}) has size {image['width']!r}x{image['height']!r}; give its pixel size"
    return None


def _category_problem(category: dict) -> str | None:
    if problem := _missing(category, ("id", "name")):
        return problem
    if not isinstance(category["name"], str):
        return f"(id {category['id']!r}) has name {category['name']!r}, not a string"
    return None


def _box_problem(annotation: dict) -> str | None:
    if problem := _missing(annotation, ("image_id", "category_id", "bbox")):
        return problem
    box = annotation["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(value) for value in box)):
        return f"(id {annotation.get('id')!r}) has bbox {box!r}, not [x, y, width, height] in pixels"
    return None
