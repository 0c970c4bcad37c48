"""Figures of the precision comparison: a JSON summary, a Markdown table and the reward curves (PNG).

    python bench/learning/report.py bench/learning/results/small-parity

Reads each run folder (`config.yaml`, `metrics.csv`, `held_out.json`, as `collect.py` keeps them) and groups
them by task, precision and rollout engine. Per group, over its seeds: the held-out reward before and after
GRPO, the task's reward and greedy metric before and after, the difference to bf16 with its standard error,
and the export gap (the merged, re-quantised model's reward minus the trained policy's). A quantised group is
compared with the bf16 group of the same engine when there is one: the engine decides what the rollouts and
the held-out check sample from, so comparing across engines would mix two effects. Writes `summary.json`,
`table.md` and `curves.png` next to the run folders.
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
PLAIN_ENGINE = "hf"  # `generate` on the training-time model: every run before the held-out engine existed
SMOOTHING = 10  # optimizer steps in the moving average of the plotted train/reward
MISMATCH = "rollout/logprob_mismatch_mean"


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


def engine_label(config: dict, held_out: dict) -> str:
    """The rollout engine of the GRPO rollouts, and the held-out check's when it differs."""
    rollouts = config.get("algorithm", {}).get("rollout_engine", PLAIN_ENGINE)
    check = held_out.get("rollout_engine", PLAIN_ENGINE)
    return rollouts if rollouts == check else f"{rollouts}, held-out {check}"


def load_run(folder: Path) -> dict | None:
    """One run folder, or None when it holds no held-out result after GRPO (it did not get that far)."""
    if not (folder / "held_out.json").exists():
        return None
    held_out = json.loads((folder / "held_out.json").read_text())
    if "after" not in held_out:
        return None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    with (folder / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/reward")]
    # Logged by the static engines: |training log-prob - sampler log-prob| per token, the mismatch that
    # truncated importance sampling corrects (none with plain generate, which samples the training forward).
    mismatch = [float(row[MISMATCH]) for row in rows if row.get(MISMATCH)]
    return {
        "name": folder.name,
        "task": config["task"]["name"],
        "precision": precision_label(config),
        "engine": engine_label(config, held_out),
        "seed": config["seed"],
        "held_out": held_out,
        "curve": [float(row["train/reward"]) for row in rows],
        "mismatch": statistics.fmean(mismatch) if mismatch else None,
    }


def group_label(precision: str, engine: str) -> str:
    return precision if engine == PLAIN_ENGINE else f"{precision} [{engine}]"


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def difference(stats: dict, base: dict, key: str) -> tuple[float, float]:
    """Difference of two group means of `key`, and its standard error over independent seeds."""
    (mean, spread), n = stats[key], len(stats["seeds"])
    (base_mean, base_spread), base_n = base[key], len(base["seeds"])
    return mean - base_mean, math.sqrt(spread**2 / n + base_spread**2 / base_n)


def group_stats(group: list[dict], reward_key: str, greedy_key: str) -> dict:
    """Mean and spread over the group's seeds of each reported figure (export gaps over runs that measured it)."""
    merged = [r["held_out"] for r in group if "merged" in r["held_out"]]
    columns = {
        "reward_total_before": [r["held_out"]["before"]["reward/total"] for r in group],
        "reward_total": [r["held_out"]["after"]["reward/total"] for r in group],
        f"{reward_key}_before": [r["held_out"]["before"][reward_key] for r in group],
        reward_key: [r["held_out"]["after"][reward_key] for r in group],
        f"{greedy_key}_before": [r["held_out"]["before"][greedy_key] for r in group],
        greedy_key: [r["held_out"]["after"][greedy_key] for r in group],
        # The export gap: the deployable (merged, re-quantised) model against the trained policy.
        "export_gap_total": [h["merged"]["reward/total"] - h["after"]["reward/total"] for h in merged],
        "export_gap_total_abs": [
            abs(h["merged"]["reward/total"] - h["after"]["reward/total"]) for h in merged
        ],
        f"export_gap_{reward_key}": [h["merged"][reward_key] - h["after"][reward_key] for h in merged],
    }
    mismatch = [r["mismatch"] for r in group if r.get("mismatch") is not None]
    if mismatch:
        columns["sampler_mismatch"] = mismatch
    stats = {key: list(mean_spread(values)) for key, values in columns.items() if values}
    return stats | {"seeds": sorted(r["seed"] for r in group), "export_gap_runs": len(merged)}


def summarise(runs: list[dict]) -> dict:
    """{task: {group label: {figure: [mean, spread], "seeds": [...], "precision", "engine", ...}}}"""
    summary: dict = {}
    for task, (reward_key, greedy_key) in TASK_METRICS.items():
        engines = sorted({r["engine"] for r in runs if r["task"] == task}, key=lambda e: e != PLAIN_ENGINE)
        for engine in engines:
            for precision in PRECISIONS:
                group = [
                    r for r in runs if (r["task"], r["precision"], r["engine"]) == (task, precision, engine)
                ]
                if group:
                    stats = group_stats(group, reward_key, greedy_key)
                    stats |= {"precision": precision, "engine": engine}
                    summary.setdefault(task, {})[group_label(precision, engine)] = stats
    for groups in summary.values():
        for stats in groups.values():
            reference = group_label("bf16", stats["engine"])
            if reference not in groups:
                reference = "bf16" if "bf16" in groups else None  # no bf16 of this engine: the plain one
            if reference is None:
                continue
            stats["vs_bf16_reference"] = reference
            stats["vs_bf16_total"], stats["vs_bf16_se"] = difference(stats, groups[reference], "reward_total")
    return summary


def qat_export_gaps(groups: dict) -> list[str]:
    """Per engine: QAT's export gap against plain int4's, and the difference of their sizes (mean |gap| over
    seeds: a gap of either sign is a deployed model that differs from the trained one) with its s.e."""
    lines = []
    for engine in dict.fromkeys(stats["engine"] for stats in groups.values()):
        qat, plain = groups.get(group_label("int4+qat", engine)), groups.get(group_label("int4", engine))
        if not (qat and plain and "export_gap_total" in qat and "export_gap_total" in plain):
            continue
        change, error = difference(qat, plain, "export_gap_total_abs")
        lines.append(
            f"- export gap in total reward, {engine}: int4 + QAT {_cell(qat, 'export_gap_total', True)} against "
            f"int4 {_cell(plain, 'export_gap_total', True)}; its size per seed (|gap|) "
            f"{qat['export_gap_total_abs'][0]:.3f} against {plain['export_gap_total_abs'][0]:.3f}, "
            f"difference {change:+.3f} ± {error:.3f} s.e."
        )
    return lines


def _cell(stats: dict, key: str, signed: bool = False) -> str:
    if key not in stats:
        return "-"
    mean, spread = stats[key]
    return f"{mean:+.3f} ± {spread:.3f}" if signed else f"{mean:.3f} ± {spread:.3f}"


def _gap(stats: dict, key: str) -> str:
    # A run stopped during its last measurement has no merged figure: say over how many seeds the gap is.
    runs = stats["export_gap_runs"]
    seeds = len(stats["seeds"])
    return _cell(stats, key, True) + (f" (over {runs} of {seeds} seeds)" if runs < seeds else "")


def _mismatch(stats: dict) -> str:
    if "sampler_mismatch" not in stats:
        return "-"
    mean, spread = stats["sampler_mismatch"]
    return f"{mean:.4f} ± {spread:.4f}"


def _before_after(stats: dict, key: str) -> str:
    # The warm start is the same for every seed, so "before" varies only with the precision's base.
    return f"{stats[key + '_before'][0]:.3f} → {_cell(stats, key)}"


def _versus(stats: dict, label: str) -> str:
    reference = stats.get("vs_bf16_reference")
    if reference is None:
        return "-"  # no bf16 cell finished
    if reference == label:
        return "(reference)"
    against = "" if reference == group_label("bf16", stats["engine"]) else f" (vs {reference})"
    return f"{stats['vs_bf16_total']:+.3f} ± {stats['vs_bf16_se']:.3f}{against}"


def table(summary: dict) -> str:
    lines = [
        "Held-out rows, after GRPO: mean ± spread (sample s.d.) over seeds; before: the warm start. vs bf16: the",
        "difference of means to bf16 of the same engine, ± its standard error. Export gap: the merged, re-quantised",
        "model's reward minus the trained policy's (negative: deployment loses reward). Sampler mismatch: mean",
        "|log-prob of the training forward - the sampler's| per completion token (static engines only).",
        "",
    ]
    for task, groups in summary.items():
        reward_key, greedy_key = TASK_METRICS[task]
        lines += [
            f"**{task}**",
            "",
            f"| precision | engine | seeds | reward (total): before → after | vs bf16 (± s.e.) | {reward_key}: before → "
            f"after | {greedy_key} (greedy): before → after | export gap (total) | export gap ({reward_key}) | "
            "sampler mismatch |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, s in groups.items():
            seeds = ",".join(str(seed) for seed in s["seeds"])
            lines.append(
                f"| {s['precision']} | {s['engine']} | {seeds} | {_before_after(s, 'reward_total')} | "
                f"{_versus(s, label)} | {_before_after(s, reward_key)} | {_before_after(s, greedy_key)} | "
                f"{_gap(s, 'export_gap_total')} | {_gap(s, f'export_gap_{reward_key}')} | "
                f"{_mismatch(s)} |"
            )
        lines += ["", *qat_export_gaps(groups), ""]
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    tasks = list(summary)
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for label, stats in summary[task].items():
            key = (task, stats["precision"], stats["engine"])
            curves = [r["curve"] for r in runs if (r["task"], r["precision"], r["engine"]) == key]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            style = "-" if stats["engine"] == PLAIN_ENGINE else "--"
            axis.plot(range(1, length + 1), moving_average(mean, SMOOTHING), style, label=label)
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
    plot(runs, summary, folder / "curves.png")
    print(table(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
