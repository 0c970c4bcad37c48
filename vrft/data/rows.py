"""What every row builder shares: the check that the images it lists exist, and rows as a DatasetDict."""

from __future__ import annotations

from pathlib import Path

import datasets

ON_MISSING = ("error", "skip")


def missing_files(paths: dict, on_missing: str, source: str | Path) -> set:
    """The keys of ``paths`` whose file is missing; raises ``FileNotFoundError`` on any for "error"."""
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


# Inferred from rows whose lists are all empty (no crowd region among them), the type would be list of null.
_PIXEL_BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))


def to_dataset(rows: list[dict], split: str) -> datasets.DatasetDict:
    """``rows`` as the one split ``split`` of a DatasetDict, ``image`` a lazily decoded Image column."""
    # Box lists become float pixels; other columns' types are inferred.
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    for column in ("pixel_boxes", "crowd_boxes"):
        if column in table.column_names:
            table = table.cast_column(column, _PIXEL_BOXES)
    return datasets.DatasetDict({split: table})
