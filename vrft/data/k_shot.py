"""k-shot subsets: ``k`` rows per class, seeded, nested so that the 1-shot set lies inside the 2-shot set."""

from __future__ import annotations

import random
from collections.abc import Callable

import datasets

from vrft.rewards.parsing import extract_answer


def nested_sample(pool: list, count: int, seed: int, key: str) -> list:
    """``count`` items of ``pool`` sampled with ``seed`` for class ``key``, in pool order."""
    # A shuffle seeded per class (not one shared stream) makes the 1-shot set
    # a subset of the 2-shot set of one seed, and each class's sample independent of the other classes.
    shuffled = list(pool)
    random.Random(f"{seed}:{key}").shuffle(shuffled)
    chosen = set(shuffled[:count])
    return [item for item in pool if item in chosen]


def subsample_k_shot(
    dataset: datasets.Dataset, k: int, seed: int = 0, label_fn: Callable[[str], str] | None = None
) -> datasets.Dataset:
    """Keep ``k`` rows per class, sampled with ``seed``; rows keep their original order.

    The class of a row is ``label_fn(solution)``, by default the text inside ``<answer>``. Sets
    are nested: with one seed the 1-shot rows are among the 2-shot rows, which are among the 4-shot.
    Raises ``ValueError`` naming every class with fewer than ``k`` rows.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"subsample_k_shot takes one split, not splits {list(dataset)}; pass dataset['train']"
        )
    if k < 1:
        raise ValueError(f"k={k} must be at least 1 (rows per class)")
    label_fn = label_fn or (lambda solution: extract_answer(solution) or solution.strip())
    solutions = dataset["solution"]  # one column: no image is decoded
    # a JSON row without a solution reads as None: named here, not as a trace from inside the label function
    missing = [index for index, solution in enumerate(solutions) if not isinstance(solution, str)]
    if missing:
        rows = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(
            f"{len(missing)} row(s) have no solution string (rows {rows}; row {missing[0]} holds "
            f"{solutions[missing[0]]!r}); give every row its label as <answer>label</answer>, or drop those rows "
            "first with Dataset.filter"
        )
    by_label: dict[str, list[int]] = {}
    for index, solution in enumerate(solutions):
        by_label.setdefault(label_fn(solution), []).append(index)
    short = {label: len(indices) for label, indices in by_label.items() if len(indices) < k}
    if short:
        listed = ", ".join(f"'{label}' ({count})" for label, count in sorted(short.items()))
        raise ValueError(
            f"{len(short)} class(es) have fewer than k={k} rows: {listed}; lower k to {min(short.values())} "
            "or drop those classes first with Dataset.filter"
        )
    chosen = [i for label in by_label for i in nested_sample(by_label[label], k, seed, label)]
    return dataset.select(sorted(chosen))
