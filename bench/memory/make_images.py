"""A small Visual-RFT classification set of large images for the memory benchmark.

896 x 448 pixels is exactly 401408 = 512 x 28 x 28: at `max_pixels=401408` every image becomes 512 visual
tokens, Visual-RFT's worst case. Smaller `max_pixels` settings downscale the same images (the image sweep).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from vrft.data.prompts import classification_prompt

WIDTH, HEIGHT = 896, 448
SPECIES = ("daisy", "tulip", "rose", "sunflower")


def image(index: int) -> Image.Image:
    """A smooth gradient with a few filled shapes (compresses well, decodes fast)."""
    rng = np.random.default_rng(index)
    x = np.linspace(0, 1, WIDTH)[None, :, None]
    y = np.linspace(0, 1, HEIGHT)[:, None, None]
    colour = rng.uniform(0, 255, size=(1, 1, 3))
    pixels = (colour * (0.5 + 0.5 * x) * (0.6 + 0.4 * y)).astype(np.uint8)
    picture = Image.fromarray(np.broadcast_to(pixels, (HEIGHT, WIDTH, 3)).copy())
    canvas = ImageDraw.Draw(picture)
    for _ in range(6):
        x1, y1 = int(rng.integers(0, WIDTH - 80)), int(rng.integers(0, HEIGHT - 80))
        size = int(rng.integers(30, 80))
        canvas.ellipse((x1, y1, x1 + size, y1 + size), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return picture


def write(folder: Path, rows: int = 8) -> Path:
    """Write `rows` rows (split `train`) with `save_to_disk` into `folder`; returns it."""
    problem = classification_prompt()
    table = {
        "image": [image(i) for i in range(rows)],
        "problem": [problem] * rows,
        "solution": [f"<answer>{SPECIES[i % len(SPECIES)]}</answer>" for i in range(rows)],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    )
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    print(write(args.folder, args.rows))
