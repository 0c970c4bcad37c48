r"""Lenient reading of model text: the ``<answer>`` block, detection lists and grounding boxes.

Every parser returns ``None`` for text it cannot read instead of raising: a reward must score any
string a policy can emit, including cut-off, garbled and adversarial ones. Parsing is linear in the
text length: digit runs are capped at 16, whitespace runs are matched possessively (``\s*+``, Python
3.11) so that a failed match never re-splits a run between two quantifiers, and tag blocks are found
with ``str.find`` rather than a lazy ``.*?`` that rescans the text once per opening tag.
bench/rewards/worst_case.py times every reward on the inputs that used to be quadratic.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vrft.rewards.boxes import Box, normalize_box

# Completions are at most a few thousand characters (256-1024 tokens); anything longer is cut
# before parsing so that a degenerate generation cannot make a reward slow.
MAX_COMPLETION_CHARS = 20_000
# A policy that spams boxes is already penalised through max(N_gt, N_pred); boxes past this count
# are ignored so that matching (O(N_pred * N_gt)) stays cheap.
MAX_BOXES = 100

_OPEN, _CLOSE = "<answer>", "</answer>"
_NUMBER = r"[-+]?(?:\d{1,16}(?:\.\d{0,16})?|\.\d{1,16})(?:[eE][-+]?\d{1,4})?|[-+]?(?:nan|inf(?:inity)?)"
# What a ground-truth row may hold, checked once when the data loads (the check_*_solution functions):
# as many boxes as a prediction may count (MAX_BOXES, also COCOeval's maxDets), and room for them in
# characters (about 45 per box). A reward call on the largest allowed row stays within bench/rewards'
# budget; a longer solution reaching a reward anyway scores the reward's lowest value, unparsed.
MAX_SOLUTION_CHARS = 16_000
MAX_SOLUTION_BOXES = MAX_BOXES
_NO_OBJECTS = re.compile(r"[\W_]*+no\s*+objects?+[\W_]*+", re.IGNORECASE)
_EMPTY_LIST = re.compile(r"\[[\[\s]*+\][\]\s]*+")
_DICT = re.compile(r"\{([^{}]*+)\}")
_POSITION = re.compile(
    rf"position['\"]?\s*+:\s*+\[++\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+\]",
    re.IGNORECASE,
)
_CONFIDENCE = re.compile(rf"confidence['\"]?\s*+:\s*+['\"]?({_NUMBER})", re.IGNORECASE)
# `\s*+(?:,\s*+)?` between the two corners: the old `\s*,?\s*` split a whitespace run between its two
# quantifiers in every possible way before failing, quadratic in the run's length.
_GROUNDING_BOX = re.compile(
    rf"\(\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+\)\s*+(?:,\s*+)?\(\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+\)"
    rf"|\[\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+,\s*+({_NUMBER})\s*+\]",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Detection:
    """One predicted or ground-truth box of a detection answer."""

    box: Box  # (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, in the task's coordinate convention
    confidence: float  # in [0, 1]; NaN or missing reads as 0.0, anything else is clipped


def check_solution_size(solution: object) -> None:
    """Raise ``ValueError`` when a ground-truth string is longer than ``MAX_SOLUTION_CHARS``.

    Checked first by every ``check_*_solution``, so an oversized row is refused before it is parsed.
    """
    if isinstance(solution, str) and len(solution) > MAX_SOLUTION_CHARS:
        raise ValueError(
            f"solution has {len(solution):,} characters, more than the {MAX_SOLUTION_CHARS:,} a ground-truth "
            "row may hold; shorten it or drop the row (data.on_bad_row=skip)"
        )


def completion_text(completion: Any) -> str:
    """Return the text of a completion given as a string or as TRL-style chat messages.

    ``[{"role": "assistant", "content": "..."}]`` yields the last message's content; content given
    as a list of parts keeps its ``text`` parts. Anything else is converted with ``str``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return str(content)
    return "" if completion is None else str(completion)


def extract_answer(text: str, allow_unclosed: bool = False) -> str | None:
    """Return the stripped text of the first ``<answer>`` block, or ``None`` when there is none.

    With ``allow_unclosed`` a block whose ``</answer>`` was cut off (generation hit the token limit)
    runs to the end of the text, so that the complete part of a long list can still be scored.
    """
    start = text.find(_OPEN)
    if start < 0:
        return None
    start += len(_OPEN)
    end = text.find(_CLOSE, start)
    if end < 0:
        if not allow_unclosed:
            return None
        end = len(text)
    return text[start:end].strip()


def reference_answer(text: str) -> str:
    """Extract an answer the way the reference does: the first one-line block, else the whole text.

    This is the source of the reference's loopholes (a completion without tags is scored as a
    whole); it backs the ``compat=True`` mode of the rewards.
    """
    text = text[:MAX_COMPLETION_CHARS]
    # The reference's regex `<answer>(.*?)</answer>` without DOTALL: the first block that closes on the
    # line it opens. Line by line with str.find, because the lazy regex rescans to the end of the line
    # once per `<answer>` (quadratic on a line of repeated opening tags). Within a line the first
    # `<answer>` decides: a later one has even less text after it in which to find `</answer>`.
    for line in text.split("\n"):
        start = line.find(_OPEN)
        if start < 0:
            continue
        end = line.find(_CLOSE, start + len(_OPEN))
        if end >= 0:
            return line[start + len(_OPEN) : end].strip()
    return text.strip()


def read_answer(text: str, compat: bool, allow_unclosed: bool = False) -> str | None:
    """Answer text as the rewards read it: the reference's fallback with ``compat``, tags otherwise."""
    if compat:
        return reference_answer(text)
    return extract_answer(text[:MAX_COMPLETION_CHARS], allow_unclosed=allow_unclosed)


def _finite_floats(values: Sequence[str | None]) -> list[float] | None:
    numbers = [float(value) for value in values if value is not None]
    return numbers if all(math.isfinite(number) for number in numbers) else None


def _clip_confidence(value: float) -> float:
    # NaN carries no information, so it reads as "not confident"; +inf/-inf clip to 1/0.
    return 0.0 if math.isnan(value) else min(1.0, max(0.0, value))


def parse_detection_answer(
    answer: str, max_boxes: int | None = MAX_BOXES, max_chars: int | None = MAX_COMPLETION_CHARS
) -> list[Detection] | None:
    """Parse ``[{'Position': [x1, y1, x2, y2], 'Confidence': 0.93}, ...]`` leniently.

    Accepts single or double quotes, ``[[``/``]]``, any key case, a cut-off list (only complete
    ``{...}`` entries count) and "No Objects" or ``[]`` (both give an empty list). Returns ``None``
    when no entry is found or an entry has no ``Position`` of four finite numbers. A missing or
    non-numeric ``Confidence`` reads as 0.0. Coordinates are reordered so that x1 <= x2, y1 <= y2.
    Ground truth is parsed with ``max_boxes=None, max_chars=None`` so that nothing is cut.
    """
    text = (answer if max_chars is None else answer[:max_chars]).strip()
    if _NO_OBJECTS.fullmatch(text) or _EMPTY_LIST.fullmatch(text):
        return []
    detections = []
    for entry in itertools.islice(_DICT.finditer(text), max_boxes):
        position = _POSITION.search(entry.group(1))
        coordinates = _finite_floats(position.groups()) if position else None
        if coordinates is None:
            return None
        confidence = _CONFIDENCE.search(entry.group(1))
        score = _clip_confidence(float(confidence.group(1))) if confidence else 0.0
        detections.append(Detection(normalize_box(coordinates), score))
    return detections or None


def parse_grounding_box(answer: str, max_chars: int | None = MAX_COMPLETION_CHARS) -> Box | None:
    """Parse the first box written as ``(x1,y1),(x2,y2)`` or ``[x1, y1, x2, y2]``.

    Returns the box with x1 <= x2, y1 <= y2, or ``None`` when there is no box or a coordinate is
    not finite.
    """
    match = _GROUNDING_BOX.search(answer if max_chars is None else answer[:max_chars])
    coordinates = _finite_floats(match.groups()) if match else None
    return normalize_box(coordinates) if coordinates is not None else None


def format_detection_answer(boxes: Sequence[Sequence[int]]) -> str:
    """Write ground truth the parser reads back: ``<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}]</answer>``.

    An empty list gives ``<answer>No Objects</answer>``.
    """
    if not boxes:
        return "<answer>No Objects</answer>"
    entries = ", ".join(f"{{'Position': {list(box)}, 'Confidence': 1}}" for box in boxes)
    return f"<answer>[{entries}]</answer>"


def format_grounding_answer(box: Sequence[int]) -> str:
    """Write one box as ``<answer>(x1,y1),(x2,y2)</answer>``, the grounding ground-truth format."""
    x1, y1, x2, y2 = box
    return f"<answer>({x1},{y1}),({x2},{y2})</answer>"
