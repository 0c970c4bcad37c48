"""Figures of the precision comparison: a JSON summary, a Markdown table and the reward curves (PNG).

    python bench/learning/report.py bench/learning/results/parity

Reads each run folder (`config.yaml`, `metrics.csv`, `held_out.json`, as `collect.py` keeps them) and groups
them by task and precision. Per group: mean and spread (sample standard deviation over seeds) of the held-out
reward after GRPO, its change from the warm start, the task metric on greedy answers, and the loss from
merging the adapter into the base and quantising again (deployment). Writes `summary.json`, `table.md` and
`curves.png` next to the run folders.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PRECISIONS = ("bf16", "int8", "mixed", "int4", "int4+qat")
# The metric reported per task: the held-out sampled reward that decides correctness, and the greedy metric.
TASK_METRICS = {
    "classification": ("reward/accuracy", "greedy/accuracy"),
    "detection": ("reward/iou", "greedy/map_50"),
    "grounding": ("reward/grounding", "greedy/miou"),
}
SMOOTHING = 10  # optimizer steps in the moving average of the plotted train/reward


def precision_label(config: dict) -> str:
    target = config["precision"]["_target_"].rsplit(".", 1)[-1]
    label = {
        "Bf16Precision": "bf16",
        "Fp32Precision": "fp32",
        "Fp16Precision": "fp16",
        "Int8Precision": "int8",
        "MixedInt8Precision": "mixed",
        "Int4Precision": "int4",
    }[target]
    return label + ("+qat" if config["precision"].get("qat") else "")


def load_run(folder: Path) -> dict | None:
    if not (folder / "held_out.json").exists():
        return None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    with (folder / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/reward")]
    return {
        "name": folder.name,
        "task": config["task"]["name"],
        "precision": precision_label(config),
        "seed": config["seed"],
        "held_out": json.loads((folder / "held_out.json").read_text()),
        "curve": [float(row["train/reward"]) for row in rows],
    }


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
    """{task: {precision: {metric: [mean, spread], ..., "seeds": n}}}"""
    summary: dict = {}
    for task, (reward_key, greedy_key) in TASK_METRICS.items():
        for precision in PRECISIONS:
            group = [r for r in runs if r["task"] == task and r["precision"] == precision]
            if not group:
                continue
            columns = {
                "reward_total": [r["held_out"]["after"]["reward/total"] for r in group],
                "reward_total_gain": [
                    r["held_out"]["after"]["reward/total"] - r["held_out"]["before"]["reward/total"]
                    for r in group
                ],
                reward_key: [r["held_out"]["after"][reward_key] for r in group],
                f"{reward_key}_gain": [
                    r["held_out"]["after"][reward_key] - r["held_out"]["before"][reward_key] for r in group
                ],
                greedy_key: [r["held_out"]["after"][greedy_key] for r in group],
                "merge_loss_total": [
                    r["held_out"]["after"]["reward/total"] - r["held_out"]["merged"]["reward/total"]
                    for r in group
                    if "merged" in r["held_out"]
                ],
                # The export gap in the task's own reward: the trained policy against the deployable model.
                f"merge_loss_{reward_key}": [
                    r["held_out"]["after"][reward_key] - r["held_out"]["merged"][reward_key]
                    for r in group
                    if "merged" in r["held_out"]
                ],
            }
            summary.setdefault(task, {})[precision] = {
                key: list(mean_spread(values)) for key, values in columns.items() if values
            } | {"seeds": len(group)}
    for groups in summary.values():
        if "bf16" not in groups:
            continue
        base = groups["bf16"]
        for stats in groups.values():
            stats["vs_bf16_total"] = stats["reward_total"][0] - base["reward_total"][0]
            # Standard error of a difference of two means over independent seeds.
            stats["vs_bf16_se"] = math.sqrt(
                stats["reward_total"][1] ** 2 / stats["seeds"] + base["reward_total"][1] ** 2 / base["seeds"]
            )
    return summary


def _cell(stats: dict, key: str, signed: bool = False) -> str:
    mean, spread = stats[key]
    return f"{mean:+.3f} ± {spread:.3f}" if signed else f"{mean:.3f} ± {spread:.3f}"


def _optional(stats: dict, key: str) -> str:
    return _cell(stats, key, True) if key in stats else "-"


def _versus(stats: dict) -> str:
    if "vs_bf16_total" not in stats:
        return "-"  # no bf16 cell finished
    return f"{stats['vs_bf16_total']:+.3f} ± {stats['vs_bf16_se']:.3f}"


def table(summary: dict) -> str:
    lines = []
    for task, groups in summary.items():
        reward_key, greedy_key = TASK_METRICS[task]
        lines += [
            f"**{task}** (held-out, mean ± spread over {max(g['seeds'] for g in groups.values())} seeds)",
            "",
            f"| precision | reward (total) | vs bf16 (± s.e.) | gain from warm start | {reward_key} | gain | "
            f"{greedy_key} (greedy) | merge + requantise loss (total) | (in {reward_key}) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for precision, s in groups.items():
            lines.append(
                f"| {precision} | {_cell(s, 'reward_total')} | {_versus(s)} | "
                f"{_cell(s, 'reward_total_gain', True)} | {_cell(s, reward_key)} | "
                f"{_cell(s, reward_key + '_gain', True)} | {_cell(s, greedy_key)} | "
                f"{_optional(s, 'merge_loss_total')} | {_optional(s, 'merge_loss_' + reward_key)} |"
            )
        lines.append("")
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(runs: list[dict], path: Path) -> None:
    tasks = [t for t in TASK_METRICS if any(r["task"] == t for r in runs)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for precision in PRECISIONS:
            curves = [r["curve"] for r in runs if r["task"] == task and r["precision"] == precision]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            axis.plot(range(1, length + 1), moving_average(mean, SMOOTHING), label=precision)
        axis.set_title(f"{task}: train/reward (mean of seeds, {SMOOTHING}-step moving average)")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("reward")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(folder: Path) -> None:
    runs = [run for sub in sorted(folder.iterdir()) if sub.is_dir() and (run := load_run(sub))]
    summary = summarise(runs)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "table.md").write_text(table(summary))
    plot(runs, folder / "curves.png")
    print(table(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
