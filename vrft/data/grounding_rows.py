"""Visual-RFT reasoning-grounding rows from a LISA-style JSON list of image, instruction and pixel box."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
from PIL import Image

from vrft.data.prompts import grounding_prompt
from vrft.data.rows import missing_files, to_dataset
from vrft.rewards.boxes import check_coord_convention, pixels_to_convention
from vrft.rewards.parsing import format_grounding_answer

_GROUNDING_KEYS = {"image", "instruction", "box"}


def _pixel_box(value: object, where: str, width: int, height: int) -> list[float]:
    numbers = list(value) if isinstance(value, list | tuple) else []
    if len(numbers) != 4 or not all(isinstance(n, int | float) and math.isfinite(n) for n in numbers):
        raise ValueError(f"{where}: box {value!r} is not [x1, y1, x2, y2] in pixels; fix the entry")
    # Boxes traced from masks may overshoot the border by rounding; clamping keeps them on the image.
    x1, y1, x2, y2 = (min(max(0.0, n), limit) for n, limit in zip(numbers, (width, height) * 2, strict=True))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: box {value!r} has no area inside the {width}x{height} image; fix it")
    return [x1, y1, x2, y2]


def build_grounding_rows(
    json_path: str | Path,
    image_dir: str | Path | None = None,
    coord_convention: str = "qwen2vl",
    on_missing: str = "error",
    split: str = "train",
) -> datasets.DatasetDict:
    """Visual-RFT grounding rows from a LISA-style JSON list of ``{"image", "instruction", "box"}``.

    ``box`` is ``[x1, y1, x2, y2]`` in pixels; it is written in ``coord_convention`` as
    ``<answer>(x1,y1),(x2,y2)</answer>``. Image paths are relative to ``image_dir`` (default: the
    JSON file's folder). Only image headers are read (for width and height).
    """
    check_coord_convention(coord_convention)
    with open(json_path) as file:
        entries = json.load(file)
    if not isinstance(entries, list):
        raise ValueError(f"'{json_path}' holds a {type(entries).__name__}; expected a list of entries")
    bad = [i for i, e in enumerate(entries) if not (isinstance(e, dict) and _GROUNDING_KEYS <= e.keys())]
    if bad:
        raise ValueError(
            f"entries {bad[:5]} of '{json_path}' lack image, instruction or box; each entry needs all three "
            "(box as [x1, y1, x2, y2] in pixels)"
        )
    # null or a number stopped the build with a TypeError from the path join (image) or from pyarrow (instruction)
    not_text = [
        (index, key, entry[key])
        for index, entry in enumerate(entries)
        for key in ("image", "instruction")
        if not (isinstance(entry[key], str) and entry[key].strip())
    ]
    if not_text:
        index, key, value = not_text[0]
        raise ValueError(
            f"entries {sorted({i for i, _, _ in not_text})[:5]} of '{json_path}' have an image or instruction that "
            f"is not a non-empty string (entry {index}: {key} {value!r}); give each entry its image's file name "
            "and its instruction as one string"
        )
    base = Path(image_dir) if image_dir is not None else Path(json_path).parent
    paths = {index: base / entry["image"] for index, entry in enumerate(entries)}
    missing = missing_files(paths, on_missing, json_path)
    rows = []
    for index, entry in enumerate(entries):
        if index in missing:
            continue
        try:
            with Image.open(paths[index]) as image:
                width, height = image.size
        except OSError as error:
            raise ValueError(f"image '{paths[index]}' of entry {index} could not be read ({error})") from None
        box = _pixel_box(entry["box"], f"entry {index} of '{json_path}'", width, height)
        answer = format_grounding_answer(pixels_to_convention(box, width, height, coord_convention))
        row = {
            "image": str(paths[index]),
            "problem": grounding_prompt(entry["instruction"]),
            "solution": answer,
        }
        rows.append({**row, "instruction": entry["instruction"], "width": width, "height": height})
    if not rows:
        raise ValueError(f"no grounding rows from '{json_path}': it lists no entries whose image exists")
    return to_dataset(rows, split)
