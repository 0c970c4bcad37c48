"""`python -m vrft.data.build`: turn real data into Visual-RFT `save_to_disk` folders.

    python -m vrft.data.build detection --annotations instances_val2017.json --images val2017/ \
        --categories cat,dog --shots 4 --out data/coco_2cat_4shot
    python -m vrft.data.build detection-eval --annotations instances_val2017.json --images val2017/ \
        --categories coco-8 --out data/coco8_eval
    python -m vrft.data.build k-shot --dataset data/ViRFT_CLS_flower_4_shot --k 1 --out data/flower_1shot
    python -m vrft.data.build grounding --json lisa_train.json --images lisa/ --out data/lisa
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets

from vrft.data.detection_rows import build_detection_rows
from vrft.data.eval_splits import CATEGORY_SETS, build_detection_eval_rows, category_list
from vrft.data.grounding_rows import build_grounding_rows
from vrft.data.k_shot import subsample_k_shot
from vrft.data.loading import load_visual_rft
from vrft.paths import check_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vrft.data.build", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    detection = commands.add_parser(
        "detection", help="COCO / LVIS annotations + image folder -> detection rows"
    )
    detection.add_argument("--annotations", required=True, help="COCO or LVIS annotation JSON")
    detection.add_argument("--images", required=True, help="folder with the images the file names")
    detection.add_argument("--categories", help="comma-separated class names (default: all)")
    detection.add_argument("--shots", type=int, help="images per class (k-shot), sampled with --seed")
    detection.add_argument("--no-objects", type=int, default=0, help="'No Objects' rows per class")
    detection.add_argument("--coord-convention", default="qwen2vl", choices=["qwen2vl", "absolute"])

    evaluation = commands.add_parser(
        "detection-eval",
        help="COCO / LVIS annotations -> a test split: every (image, category), absent ones too",
    )
    evaluation.add_argument("--annotations", required=True, help="COCO or LVIS annotation JSON")
    evaluation.add_argument("--images", required=True, help="folder with the images the file names")
    evaluation.add_argument(
        "--categories", default="coco-8", help=f"{' | '.join(CATEGORY_SETS)} | comma-separated names"
    )
    evaluation.add_argument(
        "--max-images", type=int, help="a seeded sample of this many images (default: all)"
    )
    evaluation.add_argument("--coord-convention", default="qwen2vl", choices=["qwen2vl", "absolute"])

    kshot = commands.add_parser("k-shot", help="keep k rows per class of a classification set")
    kshot.add_argument("--dataset", required=True, help="a Visual-RFT dataset (any layout vrft reads)")
    kshot.add_argument("--k", type=int, required=True)
    kshot.add_argument("--split", default="train")

    grounding = commands.add_parser("grounding", help="LISA-style JSON -> grounding rows")
    grounding.add_argument("--json", required=True, help='JSON list of {"image", "instruction", "box"}')
    grounding.add_argument("--images", help="image folder (default: the JSON file's folder)")
    grounding.add_argument("--coord-convention", default="qwen2vl", choices=["qwen2vl", "absolute"])

    for command in (detection, evaluation, grounding):
        command.add_argument(
            "--on-missing", default="error", choices=["error", "skip"], help="image files that are missing"
        )
    for command in (detection, evaluation, kshot, grounding):
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--out", required=True, help="output folder (DatasetDict.save_to_disk)")
    return parser


def build(args: argparse.Namespace) -> datasets.DatasetDict:
    """The DatasetDict a parsed command line asks for."""
    if args.command == "detection":
        categories = category_list(args.categories)  # "cat, dog" is cat and dog, not cat and " dog"
        return build_detection_rows(
            args.annotations,
            args.images,
            categories=categories,
            shots=args.shots,
            seed=args.seed,
            coord_convention=args.coord_convention,
            no_objects=args.no_objects,
            on_missing=args.on_missing,
        )
    if args.command == "detection-eval":
        return build_detection_eval_rows(
            args.annotations,
            args.images,
            categories=args.categories,
            max_images=args.max_images,
            seed=args.seed,
            coord_convention=args.coord_convention,
            on_missing=args.on_missing,
        )
    if args.command == "k-shot":
        source = load_visual_rft(args.dataset)
        if args.split not in source:
            raise ValueError(
                f"dataset '{args.dataset}' has no split '{args.split}' (has {list(source)}); pass --split"
            )
        return datasets.DatasetDict(
            {args.split: subsample_k_shot(source[args.split], args.k, seed=args.seed)}
        )
    return build_grounding_rows(
        args.json, args.images, coord_convention=args.coord_convention, on_missing=args.on_missing
    )


def check_out(args: argparse.Namespace) -> None:
    """`--out` is a new (or empty) folder outside every input: save_to_disk would write into an existing
    dataset's folder, mixing its files with the new ones, and cannot write over the dataset it reads."""
    out = Path(args.out).expanduser().resolve()
    inputs = [getattr(args, name, None) for name in ("dataset", "images", "annotations", "json")]
    for source in filter(None, inputs):
        folder = Path(source).expanduser().resolve()
        if out == folder or folder in out.parents:
            raise ValueError(f"--out {args.out} is inside the input {source}; pass a folder outside it")
    check_folder(out, "--out", "pass a new folder")  # a file there, or on its path
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"--out {args.out} is an existing folder that is not empty; pass a new folder, or move that one "
            "away first"
        )


JSON_INPUTS = {"detection": "annotations", "detection-eval": "annotations", "grounding": "json"}


def _not_json(args: argparse.Namespace, error: ValueError) -> str:
    """The one-line error for a JSON input of `args` that does not parse."""
    option = JSON_INPUTS.get(args.command)
    if option is None:  # not this command's own JSON file
        return str(error)
    return (
        f"--{option} {getattr(args, option)} is not valid JSON ({error}); pass the JSON file, downloaded or "
        "copied whole"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point; input errors print one line naming the value and the fix."""
    args = _parser().parse_args(argv)
    try:
        check_out(args)  # before any image is read
        dataset = build(args)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        # ValueErrors whose words name a place in the file but not the file
        print(f"vrft: error: {_not_json(args, error)}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as error:
        print(f"vrft: error: {error}", file=sys.stderr)
        sys.exit(2)
    dataset.save_to_disk(args.out)
    sizes = ", ".join(f"{split}: {len(rows)} rows" for split, rows in dataset.items())
    if args.command == "detection-eval":
        print(
            f"wrote {args.out} ({sizes}); evaluate with task=detection data=disk data.path={args.out} split=test"
        )
    else:
        print(f"wrote {args.out} ({sizes}); train on it with data=disk data.path={args.out}")


if __name__ == "__main__":
    main()
