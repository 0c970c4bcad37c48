"""Reading Visual-RFT datasets as users have them: `save_to_disk` folders, parquet files, JSON/JSONL."""

from __future__ import annotations

import io
import json
import re
import string
from pathlib import Path

import datasets
import pyarrow
from PIL import Image

REQUIRED_COLUMNS = ("image", "problem", "solution")
# Qwen2-VL's and Qwen2.5-VL's image processors refuse a longer side over 200 times the shorter one
# (`smart_resize`): such a row would stop the run at its first rollout instead of at the row checks.
MAX_ASPECT_RATIO = 200
# `train-00000-of-00001`, with the fingerprint older `push_to_hub` appended (`train-00000-of-00001-1a2b3c4d.parquet`,
# still on many Hub repos); a bare shard number (`0000.parquet`, the Hub's refs/convert/parquet layout
# `default/train/0000.parquet`) takes its split from the folder (`partial-train` for a cut conversion).
_SPLIT_FROM_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)(-\d+-of-\d+(-[0-9a-f]+)?)?$")
_SHARD_NUMBER = re.compile(r"^\d+$")


def check_template_fields(
    template: str,
    path: str | Path | None,
    key: str = "algorithm.prompt_template",
    dataset: datasets.DatasetDict | None = None,
) -> None:
    """Every `{field}` of a prompt template is a column of the dataset at `path` (each row's prompt is
    `template.format(**row)`): a misnamed field would stop the run at its first prompt, after the model has
    loaded and a warm start has trained. `path` None (the synthetic data): the template's braces only.
    `dataset`: that dataset, where the caller has loaded it already."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as error:  # a lone brace
        raise ValueError(
            f"{key}={template!r} is not a format string ({error}); name columns in braces, e.g. {key}='{{problem}}' "
            "(double a literal brace: '{{{{' and '}}}}')"
        ) from None
    if not fields or path is None:
        return
    dataset = load_visual_rft(path) if dataset is None else dataset
    columns = sorted({column for split in dataset.values() for column in split.column_names})
    missing = sorted(field for field in fields if field.split(".")[0].split("[")[0] not in columns)
    if missing:
        raise ValueError(
            f"{key}={template!r} asks for {missing}, not a column of the dataset at data.path='{path}' (columns: "
            f"{columns}); name columns in braces, e.g. {key}='{{problem}}'"
        )


def load_visual_rft(path: str | Path) -> datasets.DatasetDict:
    """Load a dataset with columns `image`, `problem`, `solution` from any of the published layouts.

    - a `DatasetDict.save_to_disk` folder (as the reference loads) or a single saved `Dataset` (split `train`);
    - a parquet file, or a folder of them as downloaded from the Hub (`data/train-00000-of-00001.parquet`),
      the split taken from each file name; its image column an Image feature or the encoded bytes;
    - a JSON or JSONL file whose `image` column holds paths (or `{"path": ...}` objects) relative to the file
      (split `train`).
    Images are kept undecoded (`{"bytes", "path"}`) so that a bad file is reported per row, not by pyarrow;
    so is a JSON row whose image is not one path (a list, a number), kept as it is for `decode_image` to name.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.path='{path}' does not exist; point it at a save_to_disk folder, a parquet file or folder, "
            "or a JSON/JSONL file with image, problem and solution"
        )
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        dataset = _load_saved(path)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        dataset = _load_parquet(path)
    elif path.suffix in (".json", ".jsonl"):
        dataset = _load_json(path)
    else:
        raise ValueError(
            f"data.path='{path}' is neither a save_to_disk folder, parquet, nor JSON/JSONL; "
            "convert it to one of those (see README, 'Training on your data and checkpoint')"
        )
    for split, table in dataset.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(
                f"dataset '{path}' split '{split}' lacks column(s) {missing} (has {table.column_names}); vrft reads "
                "the Visual-RFT schema image/problem/solution: rename your columns with "
                "Dataset.rename_column or build the rows with python -m vrft.data.build"
            )
        feature = table.features["image"]
        # raw encoded bytes (a parquet file written by pandas or pyarrow) are what the Image feature stores too
        raw_bytes = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
        if isinstance(feature, datasets.Image) or raw_bytes:
            dataset[split] = table.cast_column("image", datasets.Image(decode=False))
    return dataset


def _load_saved(path: Path) -> datasets.DatasetDict:
    """A `save_to_disk` folder: a DatasetDict, or a single Dataset as split `train`."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except IndexError:
        # datasets concatenates a split's arrow files, and a split saved without rows has none to concatenate
        splits = {"train": path} if (path / "state.json").is_file() else {f.name: f for f in path.iterdir()}
        empty = sorted(split for split, folder in splits.items() if _saved_without_rows(folder))
        if not empty:
            raise
        raise ValueError(
            f"data.path='{path}' has split(s) {empty} with no rows, which datasets cannot load back; drop the "
            "split before save_to_disk (del dataset[split]) or give it rows"
        ) from None
    except (json.JSONDecodeError, pyarrow.ArrowInvalid) as error:
        # datasets' words for a cut-short JSON or arrow file name a position in it, not the folder
        raise ValueError(
            f"data.path='{path}' is a save_to_disk folder that could not be read ({error}); it was probably "
            "copied or written in part: copy it again, or save_to_disk again"
        ) from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _saved_without_rows(folder: Path) -> bool:
    return (folder / "state.json").is_file() and not any(folder.glob("*.arrow"))


def _load_parquet(path: Path) -> datasets.DatasetDict:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    by_split: dict[str, list[str]] = {}
    for file in files:
        stem = file.stem
        # a shard number names no split: its folder does, or it is the one split
        if _SHARD_NUMBER.match(stem):
            stem = file.parent.name.removeprefix("partial-") if file.parent != path else "train"
        match = _SPLIT_FROM_FILE.match(stem)
        split = match.group("split") if match and path.is_dir() else "train"
        by_split.setdefault(split, []).append(str(file))
    return datasets.load_dataset("parquet", data_files=by_split)


def _load_json(path: Path) -> datasets.DatasetDict:
    try:
        dataset = datasets.load_dataset("json", data_files={"train": str(path)})
    except (StopIteration, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        # datasets' words for an empty file (StopIteration, "corresponds to no data") or a parse error.
        cause = error.__cause__ or error
        problem = "it holds no rows" if isinstance(error, StopIteration) or "no data" in str(error) else cause
        raise ValueError(
            f"data.path='{path}' could not be read as JSON/JSONL ({problem}); write a JSON list of rows or one "
            "JSON row per line, each with image, problem and solution"
        ) from None
    if "image" not in dataset["train"].column_names:
        return dataset  # load_visual_rft names the missing column
    base = path.parent

    def beside_the_file(image: str) -> str:
        image = Path(image).expanduser()
        return str(image if image.is_absolute() else base / image)

    def absolute(row):
        image = row["image"]
        if isinstance(image, str):
            return {"image": beside_the_file(image)}
        if isinstance(image, dict) and isinstance(image.get("path"), str):
            # the datasets Image feature's {"bytes", "path"} form: its path is relative to the file too, not
            # to wherever training starts
            return {"image": {**image, "path": beside_the_file(image["path"])}}
        return {"image": image}  # None, a list, a number: named by row when rows are checked

    dataset = dataset.map(absolute)
    feature = dataset["train"].features["image"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
        return dataset  # lists or numbers (among the paths, or only them), which an image column cannot hold
    return dataset.cast_column("image", datasets.Image(decode=False))


def check_problem(problem: object) -> None:
    """Raise `ValueError` naming the fix if a row's question is missing or blank.

    A JSON row without the field reads as None, which the prompt would show as the word "None".
    """
    if problem is not None and not isinstance(problem, str):
        raise ValueError(
            f"problem {problem!r} is not a string; give every row the question to ask as one string"
        )
    if problem is None or not problem.strip():
        raise ValueError(f"problem {problem!r} is empty; give every row the question to ask")


def decode_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, an undecoded `{"bytes", "path"}` dict, or a path.

    Raises `ValueError` naming the file and the cause when it cannot be decoded, or when one side is more than
    `MAX_ASPECT_RATIO` times the other (the model's processor would refuse it at the rollout).
    """
    if isinstance(image, Image.Image):
        return _check_aspect_ratio(image.convert("RGB"), "the row's image")
    if image is None:
        raise ValueError("the row has no image; give it an image path (JSON) or image bytes")
    if not isinstance(image, (dict, str, Path)):  # a JSON row's list or number
        raise ValueError(
            f"image {image!r} is not a path; image must be one path string, so give each image a row "
            "of its own"
        )
    source = image.get("path") if isinstance(image, dict) else str(image)
    try:
        if isinstance(image, dict) and image.get("bytes"):
            opened = Image.open(io.BytesIO(image["bytes"]))
        else:
            opened = Image.open(source)
        opened.load()
        decoded = opened.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"image '{source}' could not be decoded ({error})") from None
    return _check_aspect_ratio(decoded, f"image '{source}'")


def _check_aspect_ratio(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"{name} is {width}x{height} pixels, a side more than {MAX_ASPECT_RATIO} times the other, which the "
            "Qwen2-VL processor refuses; crop or pad the image, or drop the row (data.on_bad_row=skip)"
        )
    return image
