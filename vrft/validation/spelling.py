"""The names closest to a misspelt one, for the "did you mean ...?" of the command-line errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, names: Iterable[str]) -> list[str]:
    """The names of `names` most like `word` (difflib's ratio, at least its 0.6 cutoff), sorted; several where
    they are equally close. `difflib.get_close_matches(n=1)` picks one of a tie by string order: `int5` is one
    letter from `int4` and from `int8`, and a hint naming only `int8` guesses."""
    names = list(names)
    ranked = difflib.get_close_matches(word, names, n=len(names) or 1)
    if not ranked:
        return []
    best = _likeness(word, ranked[0])
    return sorted(name for name in ranked if _likeness(word, name) == best)


def _likeness(word: str, name: str) -> float:
    # the score get_close_matches ranks by (its matcher compares the candidate against the word)
    return difflib.SequenceMatcher(None, name, word).ratio()
