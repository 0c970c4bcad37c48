"""Classification accuracy reward: does the answer name the ground-truth class, and only it?

The paper's rule ("truth in answer or answer in truth", after dropping spaces and underscores) pays
an answer of one letter ("e" is inside most class names) and an answer listing every class. The
default rule here matches whole phrases instead:

- both sides are split into words (runs of letters and digits; case, spaces, underscores and other
  punctuation do not count) and each word loses its plural ending (``label_words``);
- the answer must contain the label's words as one phrase, at word boundaries; a label written
  without spaces matches too ("pinkprimrose" names "pink primrose");
- an answer that also names another known class is wrong (classes: the reward's ``classes`` plus
  every label of the batch's solutions);
- a label of fewer than two characters is never paid (a one-letter answer never matches).

``compat=True`` keeps the paper's rule, loopholes included.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from vrft.rewards.base import Reward
from vrft.rewards.parsing import check_solution_size, extract_answer, read_answer

_WORD = re.compile(r"[^\W_]++")  # letters and digits; `_` counts as a separator, as in the reference
_MIN_LABEL_CHARS = 2


def normalize_label(text: str) -> str:
    """Matching key of the reference: strip, drop spaces and underscores, lowercase."""
    return text.strip().replace(" ", "").replace("_", "").lower()


def labels_match(predicted: str, truth: str) -> bool:
    """The reference rule on normalised labels: one contains the other."""
    return truth in predicted or predicted in truth


@functools.lru_cache(maxsize=65_536)
def singular(word: str) -> str:
    """A key shared by a lowercase word and its regular plural: "daisies"/"daisy", "buses"/"bus".

    Hand-written rather than a lemmatiser (inflect, nltk): both sides of a match go through the same
    function, so only agreement matters, not English; irregular plurals ("cacti") do not match.
    """
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        word = word[:-2]  # boxes, buses, churches
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]  # roses, cars; keeps glass, lotus, iris
    # "horses" -> "hors" above and "horse" -> "hors" here: a final e never decides a match.
    return word[:-1] if len(word) > 2 and word.endswith("e") else word


def label_words(text: str) -> list[str]:
    """The words of a label or answer as they are matched: lowercase, plural endings removed."""
    return [singular(word) for word in _WORD.findall(text.lower())]


class _Phrases:
    """An answer's words joined without spaces, with the offsets where words begin and end."""

    def __init__(self, text: str):
        words = label_words(text)
        self.joined = "".join(words)
        self.boundaries = {0}
        offset = 0
        for word in words:
            offset += len(word)
            self.boundaries.add(offset)

    def spans(self, key: str) -> list[tuple[int, int]]:
        """Where ``key`` (a joined label) occurs starting and ending at word boundaries."""
        found, start = [], self.joined.find(key)
        while start >= 0:
            if start in self.boundaries and start + len(key) in self.boundaries:
                found.append((start, start + len(key)))
            start = self.joined.find(key, start + 1)
        return found


def names_only(answer: str, label: str, known: Iterable[str]) -> bool:
    """True when ``answer`` names ``label`` as a whole phrase and no other of the ``known`` labels.

    Labels are given as joined keys (``"".join(label_words(name))``); a known label found only inside
    the matched phrase ("rose" inside "pink rose") does not count as a second class.
    """
    if len(label) < _MIN_LABEL_CHARS:
        return False
    phrases = _Phrases(answer)
    truth_spans = phrases.spans(label)
    if not truth_spans:
        return False
    for other in known:
        if other == label or not other:
            continue
        for start, end in phrases.spans(other):
            if not any(t_start <= start and end <= t_end for t_start, t_end in truth_spans):
                return False
    return True


def label_key(text: str) -> str:
    """The joined matching key of a class name: "Pink_Primroses" -> "pinkprimrose"."""
    return "".join(label_words(text))


def check_classes(classes: Sequence[str] | None) -> list[str] | None:
    """``classes`` as a list, or ``ValueError`` for one string: its letters would become the known classes, so
    an answer with a one-letter word ("a daisy") would name "another class" and score 0."""
    if classes is None:
        return None
    if isinstance(classes, str):
        raise ValueError(
            f"task.classes={classes!r} is one string, not a list of class names; write the list, e.g. "
            "task.classes=[daisy,rose,tulip], or null to take the classes from the solutions"
        )
    return [str(name) for name in classes]


class AccuracyReward(Reward):
    """1.0 when the ``<answer>`` of the completion names the solution's class, else 0.0.

    By default the answer must name the label as a whole phrase and no other known class (module
    docstring); the known classes are ``classes`` plus the labels of the batch's solutions, so that an
    answer listing several classes loses even without a class list.

    Args:
        compat: reproduce the reference exactly: its containment rule ("d" matches "daisy", a list of
            every class matches every row, an empty answer "contains" nothing and scores 1.0), and a
            completion without a one-line ``<answer>...</answer>`` is read whole. By default (False)
            the answer must sit in ``<answer>...</answer>`` (it may span lines).
        classes: every class name of the dataset (``task.classes``); None: the batch's labels only.
    """

    name = "accuracy"

    def __init__(self, compat: bool = False, classes: Sequence[str] | None = None) -> None:
        self.compat = compat
        self.classes = check_classes(classes)
        self._class_keys = {label_key(name) for name in self.classes or ()}

    def score_batch(self, completions: list[str], solutions: list[str]) -> list[float]:
        if self.compat:
            return super().score_batch(completions, solutions)
        truths = {solution: extract_answer(solution) for solution in solutions}
        keys = {solution: label_key(truth) for solution, truth in truths.items() if truth is not None}
        known = self._class_keys | set(keys.values())
        scores = []
        for completion, solution in zip(completions, solutions, strict=True):
            answer = read_answer(completion, compat=False)
            paid = answer is not None and solution in keys and names_only(answer, keys[solution], known)
            scores.append(1.0 if paid else 0.0)
        return scores

    def score(self, completion: str, solution: str) -> float:
        if not self.compat:
            return self.score_batch([completion], [solution])[0]
        predicted = read_answer(completion, self.compat)
        truth = read_answer(solution, self.compat)
        if predicted is None or truth is None:
            return 0.0
        return 1.0 if labels_match(normalize_label(predicted), normalize_label(truth)) else 0.0

    def __repr__(self) -> str:
        return f"AccuracyReward(compat={self.compat!r}, classes={self.classes!r})"


accuracy_reward = AccuracyReward()


def check_classification_solution(solution: str) -> None:
    """Raise ``ValueError`` unless ``solution`` is ``<answer>label</answer>`` with a label of 2+ characters."""
    check_solution_size(solution)
    answer = extract_answer(solution) if isinstance(solution, str) else None
    if answer is None:
        raise ValueError(
            f"solution {solution!r} has no <answer>...</answer>; wrap the ground truth as <answer>label</answer>"
        )
    if not normalize_label(answer):
        raise ValueError(
            f"solution {solution!r} has an empty label; every row needs a class name inside <answer>...</answer>"
        )
    if len(label_key(answer)) < _MIN_LABEL_CHARS:
        raise ValueError(
            f"solution {solution!r} has a label of fewer than {_MIN_LABEL_CHARS} letters or digits, which the "
            "accuracy reward never pays (a one-letter answer would game it); spell the class out"
        )
