"""Format reward: does the completion follow ``<think>...</think> <answer>...</answer>``?"""

from __future__ import annotations

import re

from vrft.rewards.base import Reward

# The reference pattern, kept for documentation and for the equivalence test.
FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
_THINK_OPEN, _ANSWER_CLOSE = "<think>", "</answer>"
_SEPARATOR = re.compile(r"</think>\s*+<answer>")


def matches_answer_format(text: str) -> bool:
    """True when ``text.strip()`` fully matches ``FORMAT_PATTERN`` with DOTALL.

    Equivalent to ``re.fullmatch(FORMAT_PATTERN, text.strip(), re.DOTALL)`` but linear: the regex
    backtracks quadratically on completions that repeat the tags, which a policy can emit. The
    text matches iff it starts with ``<think>``, ends with ``</answer>`` and some
    ``</think>\\s*<answer>`` sits between them; the leftmost one ends earliest, so it is enough.
    """
    text = text.strip()
    if not (text.startswith(_THINK_OPEN) and text.endswith(_ANSWER_CLOSE)):
        return False
    separator = _SEPARATOR.search(text, len(_THINK_OPEN))
    return separator is not None and separator.end() <= len(text) - len(_ANSWER_CLOSE)


class FormatReward(Reward):
    """1.0 when the whole completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Leading and trailing whitespace is ignored; ``solutions`` are not used.
    """

    name = "format"
    uses_solution = False

    def score(self, completion: str, solution: str) -> float:
        return 1.0 if matches_answer_format(completion) else 0.0


format_reward = FormatReward()
