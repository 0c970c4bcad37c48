"""The tables of `device_step_ab.sh`'s folder: each run's phases (seconds, cudaMalloc / cudaFree / retry
counts, the GPU's mean SM clock and power while the phase ran), then each traced row's rollout peak by
allocating site against the planner's rollout terms.

    python bench/rollout/step_ab.py DIR
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from pathlib import Path


def clock_samples(path: Path) -> list[tuple[float, float, float, str]]:
    """nvidia-smi's samples: (epoch seconds, SM MHz, watts, active throttle reasons)."""
    samples = []
    if not path.exists():
        return samples
    with path.open() as handle:
        for row in csv.reader(handle):
            try:  # the header and any line nvidia-smi wrote otherwise are skipped
                stamp = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((stamp, float(row[1]), float(row[3]), row[5].strip()))
            except (ValueError, IndexError):
                continue
    return samples


def during(samples, start: float, end: float) -> str:
    """Mean SM clock and power of the samples within [start, end], and the throttle reasons seen."""
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return "no clock sample"
    clock = sum(s[1] for s in inside) / len(inside)
    power = sum(s[2] for s in inside) / len(inside)
    reasons = sorted({s[3] for s in inside})
    return f"{clock:.0f} MHz, {power:.0f} W, throttle {','.join(reasons)} ({len(inside)} samples)"


def runs_table(folder: Path, samples) -> list[str]:
    lines = []
    for path in sorted(folder.glob("run*.json"), key=lambda p: int(p.stem[3:].split("_")[0])):
        record = json.loads(path.read_text())
        steps = ", ".join(f"{step['seconds']:.2f}" for step in record.get("steps", []))
        lines.append(
            f"{path.stem}: steps {steps} s{'  ERROR ' + record['error'] if 'error' in record else ''}"
        )
        for phase in record.get("phase_stats") or []:
            counts = " ".join(
                f"{key.replace('num_', '')} {phase.get(key, 0)}"
                for key in (
                    "num_device_alloc",
                    "num_device_free",
                    "num_alloc_retries",
                    "num_sync_all_streams",
                )
            )
            lines.append(
                f"  {phase['phase']:<9} {phase['end'] - phase['start']:6.2f} s  from {phase['start_allocated_gb']:.2f} GiB"
                f"  {counts}  {during(samples, phase['start'], phase['end'])}"
            )
    return lines


def sites(trace: dict) -> list[str]:
    lines = [
        f"  {site['gb']:7.3f} GiB {site['blocks']:5d} blocks  {site['site']}"
        for site in trace.get("sites", [])
    ]
    return lines + [f"  {trace.get('other_sites_gb', 0.0):7.3f} GiB elsewhere"]


def traces_table(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("trace_*.json")):
        record = json.loads(path.read_text())
        trace = record.get("rollout_trace") or {}
        if not trace:
            lines.append(f"{path.stem}: no trace{'  ERROR ' + record['error'] if 'error' in record else ''}")
            continue
        plan = record.get("plan") or {}
        measured = (record.get("measured") or {}).get("phases", {}).get("rollout", {})
        components = plan.get("components_gb", {})
        lines.append(
            f"{path.stem}: rollout peak allocated {measured.get('allocated_gb', float('nan')):.3f} GiB "
            f"(reserved {measured.get('reserved_gb', float('nan')):.3f}), planned "
            f"{plan.get('phases_gb', {}).get('rollout', float('nan')):.3f}; traced: from "
            f"{trace.get('start_allocated_gb', float('nan')):.3f}, peak over it "
            f"{trace.get('peak_over_start_gb', float('nan')):.3f} ({trace.get('events')} events)"
        )
        terms = ("kv_cache", "prefill", "rollout_engine")
        lines.append("  planned: " + ", ".join(f"{t} {components.get(t, float('nan')):.3f}" for t in terms))
        lines += sites(trace)
    return lines


def main() -> None:
    folder = Path(sys.argv[1])
    samples = clock_samples(folder / "clocks.csv")
    print("\n".join(runs_table(folder, samples) + [""] + traces_table(folder)))


if __name__ == "__main__":
    main()
