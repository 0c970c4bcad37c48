"""Box geometry and coordinate conventions shared by rewards, metrics and data builders.

A box is ``(x1, y1, x2, y2)``: top-left and bottom-right corners. Qwen2-VL writes boxes in a
0..1000 grid over the image ("qwen2vl"); Qwen2.5-VL writes absolute pixels ("absolute").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]
COORD_CONVENTIONS = ("qwen2vl", "absolute")
QWEN2VL_GRID = 1000


def normalize_box(coordinates: Sequence[float]) -> Box:
    """Reorder four coordinates so that x1 <= x2 and y1 <= y2 (models sometimes swap corners)."""
    x1, y1, x2, y2 = coordinates
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def clamp_box(box: Box, coord_max: float) -> Box:
    """Clamp every coordinate into ``[0, coord_max]``."""
    return tuple(min(coord_max, max(0.0, value)) for value in box)  # type: ignore[return-value]


def box_area(box: Box) -> float:
    """Area of a normalised box; zero for degenerate boxes."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _intersection_and_union(a: Box, b: Box) -> tuple[float, float]:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = width * height if width > 0 and height > 0 else 0.0
    return intersection, box_area(a) + box_area(b) - intersection


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two normalised boxes, in [0, 1].

    Zero-area unions give 0. Coordinates so large that areas overflow give 0 rather than NaN.
    """
    intersection, union = _intersection_and_union(a, b)
    iou = intersection / union if union > 0 else 0.0
    return iou if math.isfinite(iou) else 0.0


def box_giou(a: Box, b: Box) -> float:
    """Generalised IoU of two normalised boxes, in [-1, 1].

    When the enclosing box has zero area the reference returns the plain IoU; so does this. An
    overflowing enclosing area means the boxes are astronomically far apart, which is GIoU -1.
    """
    intersection, union = _intersection_and_union(a, b)
    iou = intersection / union if union > 0 else 0.0
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if enclosing <= 0:
        return iou if math.isfinite(iou) else 0.0
    giou = iou - (enclosing - union) / enclosing
    return min(1.0, max(-1.0, giou)) if math.isfinite(giou) else -1.0


def check_coord_convention(coord_convention: str) -> None:
    """Raise ``ValueError`` unless ``coord_convention`` is one of ``COORD_CONVENTIONS``."""
    if coord_convention not in COORD_CONVENTIONS:
        raise ValueError(
            f"coord_convention {coord_convention!r} is not known; use 'qwen2vl' (0..1000 grid, "
            "Qwen2-VL) or 'absolute' (pixels, Qwen2.5-VL)"
        )


def pixels_to_convention(box: Sequence[float], width: int, height: int, coord_convention: str) -> list[int]:
    """Convert a pixel xyxy box into the integer coordinates a model of that convention writes."""
    check_coord_convention(coord_convention)
    x1, y1, x2, y2 = box
    if coord_convention == "absolute":
        return [round(x1), round(y1), round(x2), round(y2)]
    scale_x, scale_y = QWEN2VL_GRID / width, QWEN2VL_GRID / height
    return [round(x1 * scale_x), round(y1 * scale_y), round(x2 * scale_x), round(y2 * scale_y)]


def convention_to_pixels(box: Sequence[float], width: int, height: int, coord_convention: str) -> Box:
    """Convert a box written in ``coord_convention`` into pixel xyxy coordinates (not clipped)."""
    check_coord_convention(coord_convention)
    x1, y1, x2, y2 = box
    if coord_convention == "absolute":
        return (float(x1), float(y1), float(x2), float(y2))
    scale_x, scale_y = width / QWEN2VL_GRID, height / QWEN2VL_GRID
    return (x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y)
