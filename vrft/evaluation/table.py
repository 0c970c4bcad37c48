"""The before/after table of an evaluation: one row per metric, one column per model, differences to the base."""

from __future__ import annotations

import math
from collections.abc import Mapping


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _difference(value: float | None, base: float | None) -> str:
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{100 * (value - base):+.1f}"


def comparison_table(results: Mapping[str, Mapping[str, float]], base: str | None = "base") -> str:
    """A markdown table of `results` (model label -> metrics), values in percent (x100, as the paper prints).

    When `base` is one of the models, every other model gets a column with its difference to it.
    """
    models = list(results)
    metrics = list(dict.fromkeys(key for model in models for key in results[model]))
    header, rule = ["metric (%)"], ["---"]
    for model in models:
        header.append(model)
        rule.append("---:")
        if base in results and model != base:
            header.append(f"Δ vs {base}")
            rule.append("---:")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for metric in metrics:
        cells = [metric]
        for model in models:
            value = results[model].get(metric)
            cells.append(_percent(value))
            if base in results and model != base:
                cells.append(_difference(value, results[base].get(metric)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
