"""Visual-RFT rows from real data: the prompts, COCO/LVIS detection, LISA grounding, k-shot subsets.

Builders return a ``datasets.DatasetDict`` in the Visual-RFT schema (``image`` as a lazily decoded
path, ``problem``, ``solution``) plus what evaluation needs (``category``, ``width``, ...). Boxes are
written as integers in the model's convention: "qwen2vl" (0..1000 grid) or "absolute" (pixels).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image

from vrft.data.annotations import read_coco
from vrft.rewards.boxes import check_coord_convention, pixels_to_convention
from vrft.rewards.parsing import extract_answer, format_detection_answer, format_grounding_answer

# The reference prompts, verbatim (including "tags.The" and, for grounding, "grouding" and the stray
# ")"): the published checkpoints were trained on exactly this text.
_DETECTION_PROMPT = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    "({range}) and confidence (between 0 and 1, with two decimal places). If no object belonging to the "
    "category '{category}' in the image, return 'No Objects'. Output the thinking process in <think> </think> "
    "and final answer in <answer> </answer> tags.The output answer format should be as follows: <think> ... "
    "</think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer> Please strictly "
    "follow the format."
)
_BOX_RANGE = {"qwen2vl": "between 0 and 1000, integer", "absolute": "in pixels, integer"}
_CLASSIFICATION_PROMPT = (
    "This is an image containing a {subject}. Please identify the {question} based on the image. Output the "
    "thinking process in <think> </think> and final answer in <answer> </answer> tags. The output answer "
    "format should be as follows: <think> ... </think> <answer>{answer_hint}</answer> Please strictly follow "
    "the format."
)
_GROUNDING_PROMPT = (
    "Output the bounding box in the image corresponding to the instruction: {instruction} Output the thinking "
    'process in <think> </think> and your grouding box. Following "<think> thinking process </think>\n'
    '<answer>(x1,y1),(x2,y2)</answer>)" format.'
)
ON_MISSING = ("error", "skip")
_GROUNDING_KEYS = {"image", "instruction", "box"}


def detection_prompt(category: str, coord_convention: str = "qwen2vl") -> str:
    """The Visual-RFT detection question for one category (the 0..1000 wording for "qwen2vl")."""
    check_coord_convention(coord_convention)
    return _DETECTION_PROMPT.format(category=category, range=_BOX_RANGE[coord_convention])


def classification_prompt(
    subject: str = "plant", question: str = "species of the plant", answer_hint: str = "species name"
) -> str:
    """The Visual-RFT classification question; the defaults give the Flowers102 prompt verbatim."""
    return _CLASSIFICATION_PROMPT.format(subject=subject, question=question, answer_hint=answer_hint)


def grounding_prompt(instruction: str) -> str:
    """The Visual-RFT reasoning-grounding question for one referring instruction."""
    return _GROUNDING_PROMPT.format(instruction=instruction)


def _missing_files(paths: dict, on_missing: str, source: str | Path) -> set:
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing={on_missing!r} is not one of {ON_MISSING}")
    missing = [key for key, path in paths.items() if not path.is_file()]
    if missing and on_missing == "error":
        examples = ", ".join(repr(str(paths[key])) for key in missing[:3])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in '{source}' are missing, e.g. {examples}; "
            "fix the image folder or pass on_missing='skip' (--on-missing skip) to drop their rows"
        )
    return set(missing)


def _nested_sample(pool: list, count: int, seed: int, key: str) -> list:
    # `count` items in pool order. A shuffle seeded per class (not one shared stream) makes the 1-shot set
    # a subset of the 2-shot set of one seed, and each class's sample independent of the other classes.
    shuffled = list(pool)
    random.Random(f"{seed}:{key}").shuffle(shuffled)
    chosen = set(shuffled[:count])
    return [item for item in pool if item in chosen]


# Inferred from rows whose lists are all empty (no crowd region among them), the type would be list of null.
_PIXEL_BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))


def _to_dataset(rows: list[dict], split: str) -> datasets.DatasetDict:
    # Paths become a lazily decoded Image column, box lists float pixels; other columns' types are inferred.
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    for column in ("pixel_boxes", "crowd_boxes"):
        if column in table.column_names:
            table = table.cast_column(column, _PIXEL_BOXES)
    return datasets.DatasetDict({split: table})


def _image_path(image: dict, image_dir: Path) -> Path:
    # COCO names the file; LVIS only gives coco_url, whose last part is the file name.
    name = image.get("file_name") or str(image.get("coco_url", "")).rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"image {image.get('id')!r} has neither file_name nor coco_url; add its file name")
    return image_dir / name


def _known_absent(image: dict, category_id: int) -> bool:
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
    annotated = _annotated_boxes(coco, images, {ids_by_name[name] for name in chosen}, coord_convention)
    boxes = {pair: truth for pair, truth in annotated.items() if truth.boxes}
    used = sorted(images) if no_objects else sorted({image_id for image_id, _ in boxes})
    paths = {image_id: _image_path(images[image_id], Path(image_dir)) for image_id in used}
    missing = _missing_files(paths, on_missing, annotation_json)
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
        for i in _nested_sample(positives, len(positives) if shots is None else shots, seed, name):
            rows.append(
                _detection_row(
                    images[i], paths[i], category_id, name, boxes[(i, category_id)], coord_convention
                )
            )
        # not an image with a crowd region or a box too thin for the grid: "No Objects" would be a wrong label
        negatives = [
            i for i in present if (i, category_id) not in annotated and _known_absent(images[i], category_id)
        ]
        if no_objects > len(negatives):
            raise ValueError(
                f"category '{name}' is absent from only {len(negatives)} images, fewer than "
                f"no_objects={no_objects}; lower no_objects to {len(negatives)}"
            )
        for i in _nested_sample(negatives, no_objects, seed, f"{name}:absent"):
            rows.append(
                _detection_row(images[i], paths[i], category_id, name, AnnotatedBoxes(), coord_convention)
            )
    if not rows:
        raise ValueError(
            f"no detection rows: none of {chosen} has a box in an image found in '{image_dir}'; "
            "check the categories and the image folder"
        )
    return _to_dataset(rows, split)


@dataclass
class AnnotatedBoxes:
    """What an annotation file says about one category in one image.

    The solution holds ``boxes``, rounded to the model's convention; the official COCO/LVIS evaluation
    compares with ``pixel_boxes`` and ignores detections on ``crowd_boxes``, so rows carry both.
    """

    boxes: list[list[int]] = field(default_factory=list)  # [N, 4] xyxy in the convention: the solution's
    pixel_boxes: list[list[float]] = field(default_factory=list)  # [M, 4] xyxy pixels, M >= N (none vanish)
    crowd_boxes: list[list[float]] = field(default_factory=list)  # [C, 4] xyxy pixels of iscrowd regions


def _annotated_boxes(
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


def _detection_row(
    image: dict, path: Path, category_id: int, category: str, truth: AnnotatedBoxes, coord_convention: str
) -> dict:
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


def subsample_k_shot(
    dataset: datasets.Dataset, k: int, seed: int = 0, label_fn: Callable[[str], str] | None = None
) -> datasets.Dataset:
    """Keep ``k`` rows per class, sampled with ``seed``; rows keep their original order.

    The class of a row is ``label_fn(solution)``, by default the text inside ``<answer>``. Sets
    are nested: with one seed the 1-shot rows are among the 2-shot rows, which are among the 4-shot.
    Raises ``ValueError`` naming every class with fewer than ``k`` rows.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"subsample_k_shot takes one split, not splits {list(dataset)}; pass dataset['train']"
        )
    if k < 1:
        raise ValueError(f"k={k} must be at least 1 (rows per class)")
    label_fn = label_fn or (lambda solution: extract_answer(solution) or solution.strip())
    solutions = dataset["solution"]  # one column: no image is decoded
    # a JSON row without a solution reads as None: named here, not as a trace from inside the label function
    missing = [index for index, solution in enumerate(solutions) if not isinstance(solution, str)]
    if missing:
        rows = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{len(missing)} row(s) have no solution string (rows {rows}; row {missing[0]} holds "
            f"{solutions[missing[0]]!r}); give every row its label as <answer>label</answer>, or drop those rows "
            "first with Dataset.filter"
        )
    by_label: dict[str, list[int]] = {}
    for index, solution in enumerate(solutions):
        by_label.setdefault(label_fn(solution), []).append(index)
    short = {label: len(indices) for label, indices in by_label.items() if len(indices) < k}
    if short:
        listed = ", ".join(f"'{label}' ({count})" for label, count in sorted(short.items()))
        raise ValueError(
            f"{len(short)} class(es) have fewer than k={k} rows: {listed}; lower k to {min(short.values())} "
            "or drop those classes first with Dataset.filter"
        )
    chosen = [i for label in by_label for i in _nested_sample(by_label[label], k, seed, label)]
    return dataset.select(sorted(chosen))


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
    missing = _missing_files(paths, on_missing, json_path)
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
    return _to_dataset(rows, split)
