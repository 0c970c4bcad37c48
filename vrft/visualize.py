"""Sample figures: a prompt's image with its ground-truth and predicted boxes, and the completion's scores.

Drawn with PIL rather than matplotlib: one small RGB image per sample, written every few steps, needs no
figure machinery, and PIL is what the data pipeline already decodes images with.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from vrft.rewards.boxes import convention_to_pixels
from vrft.rewards.parsing import extract_answer, parse_detection_answer, parse_grounding_box, reference_answer

TRUTH_COLOUR = (40, 200, 60)  # green: ground truth
PREDICTED_COLOUR = (230, 40, 40)  # red: the completion's boxes
IMAGE_WIDTH = 320  # the synthetic images are 112 px: scaled up so boxes and edges are visible
TEXT_WIDTH_CHARS = 52


def answer_boxes(text: str, task: str, is_solution: bool = False) -> list[tuple[float, float, float, float]]:
    """The boxes written in a completion's (or a solution's) answer, in the task's convention; [] if none."""
    if task not in ("detection", "grounding"):
        return []
    answer = reference_answer(text) if is_solution else extract_answer(text, allow_unclosed=True)
    if answer is None:
        return []
    if task == "grounding":
        box = parse_grounding_box(answer)
        return [box] if box is not None else []
    limits = dict(max_boxes=None, max_chars=None) if is_solution else {}
    return [d.box for d in parse_detection_answer(answer, **limits) or []]


def draw_sample(
    image: Image.Image,
    truth: Sequence[Sequence[float]],
    predicted: Sequence[Sequence[float]],
    coord_convention: str,
    caption: Sequence[str] = (),
) -> Image.Image:
    """An RGB figure: `image` with `truth` (green) and `predicted` (red) boxes, `caption` lines under it."""
    width, height = image.size
    scale = IMAGE_WIDTH / width
    canvas = image.convert("RGB").resize((IMAGE_WIDTH, round(height * scale)), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for boxes, colour in ((truth, TRUTH_COLOUR), (predicted, PREDICTED_COLOUR)):
        for box in boxes:
            x1, y1, x2, y2 = (v * scale for v in convention_to_pixels(box, width, height, coord_convention))
            draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=3)
    lines = [wrapped for line in caption for wrapped in textwrap.wrap(line, TEXT_WIDTH_CHARS) or [""]]
    font = ImageFont.load_default(size=11)
    line_height = 14
    figure = Image.new("RGB", (IMAGE_WIDTH, canvas.height + 6 + line_height * len(lines)), "white")
    figure.paste(canvas, (0, 0))
    text = ImageDraw.Draw(figure)
    for row, line in enumerate(lines):
        text.text((4, canvas.height + 4 + row * line_height), line, fill="black", font=font)
    return figure
