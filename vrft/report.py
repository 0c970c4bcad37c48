"""`python -m vrft.report <run or multirun folder>`: a table of a run's results and its curves, or of several.

For one run (a folder with `logs/metrics.csv`) it prints the first and last value of the main metrics and
writes `<run>/curves.png`: reward by component, KL (where `loss.beta` > 0), completion length and memory per
optimizer step. For a folder of runs (a Hydra multirun) it prints one row per run and writes
`<folder>/comparison.png`, each run's curves overlaid.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted (CI, SSH sessions)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Curves = dict[str, list[tuple[int, float]]]
# The four panels: title -> metric prefixes plotted in it (a run's own curves; comparisons use the first).
PANELS = {
    "reward": ("train/reward", "reward/"),
    "KL to the reference": ("train/kl",),
    "completion length (tokens)": ("train/completion_length",),
    "peak memory (GiB)": ("memory/update_peak_gb", "memory/rollout_peak_gb"),
}
# Why a panel can be empty: said on it, so that an empty axis does not read as a plotting bug.
NOT_LOGGED = {"KL to the reference": "not logged: loss.beta=0 skips the reference forward"}
TIME_KEYS = ("time/rollout_s", "time/reference_s", "time/update_s")


def read_curves(run_dir: Path, notes: list[str] | None = None) -> Curves:
    """Every numeric column of `<run>/logs/metrics.csv` as (step, value) pairs, in step order.

    A value that is not a number is skipped, counted in one line appended to `notes`: a run stopped
    mid-write leaves its last row cut (`2,3.1e`), and the rows before it still make a table.
    """
    path = Path(run_dir) / "logs" / "metrics.csv"
    curves: Curves = {}
    if not path.is_file():
        return curves
    unreadable = 0
    with path.open() as file:
        for row in csv.DictReader(file):
            if not row.get("step"):
                continue
            try:
                step = int(float(row["step"]))
            except ValueError:
                unreadable += 1
                continue
            for key, text in row.items():
                if key in ("step", None) or text in ("", None):
                    continue
                try:
                    curves.setdefault(key, []).append((step, float(text)))
                except ValueError:
                    unreadable += 1
    if unreadable and notes is not None:
        notes.append(
            f"'{path}': skipped {unreadable} unreadable value(s) (a run stopped mid-write cuts its last row)"
        )
    return curves


def _last(curves: Curves, key: str) -> float | None:
    return curves[key][-1][1] if curves.get(key) else None


def run_results(run_dir: Path, notes: list[str] | None = None) -> dict[str, float | int | None]:
    """A run's row: steps, last train metrics, peak memory, seconds per step, held-out results.

    What cannot be read (a value in metrics.csv, held_out.json) is left out and named in `notes`.
    """
    curves = read_curves(run_dir, notes)
    steps = len(curves.get("train/reward", curves.get("train/loss", [])))
    row: dict[str, float | int | None] = {"steps": steps}
    for key in ("train/reward", "train/loss", "train/kl", "train/completion_length"):
        if key in curves:
            row[key] = _last(curves, key)
    peaks = [value for key, points in curves.items() if key.endswith("peak_gb") for _, value in points]
    row["peak_memory_gb"] = max(peaks) if peaks else None
    per_step = [sum(v for _, v in curves.get(key, [])) for key in TIME_KEYS]
    row["seconds_per_step"] = sum(per_step) / steps if steps and any(per_step) else None
    held_out = Path(run_dir) / "held_out.json"
    if held_out.is_file():
        try:
            results = json.loads(held_out.read_text())
        except ValueError as error:  # cut: a run stopped mid-write, before vrft wrote it atomically
            results = {}
            if notes is not None:
                notes.append(f"'{held_out}' is not valid JSON ({error}); its held-out results are left out")
        for stage in ("before", "after", "merged"):
            for key, value in (results.get(stage) or {}).items():
                row[f"held_out/{stage}/{key}"] = value
    return row


def _panel_keys(curves: Curves, prefixes: tuple[str, ...]) -> list[str]:
    keys = [k for k in curves if any(k == p or (p.endswith("/") and k.startswith(p)) for p in prefixes)]
    return sorted(keys, key=lambda k: (k != prefixes[0], k))


def plot_runs(runs: dict[str, Curves], path: Path, title: str) -> Path:
    """Write the four panels for `runs` (label -> curves); one run shows every component of each panel."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    single = len(runs) == 1
    for axis, (panel, prefixes) in zip(axes.flat, PANELS.items(), strict=True):
        for label, curves in runs.items():
            keys = _panel_keys(curves, prefixes) if single else [k for k in prefixes[:1] if k in curves]
            for key in keys:
                steps, values = zip(*curves[key], strict=True)
                axis.plot(
                    steps, values, marker="." if len(steps) < 20 else None, label=key if single else label
                )
        axis.set_title(panel)
        axis.set_xlabel("optimizer step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            note = NOT_LOGGED.get(panel, "not logged")
            axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes, color="gray")
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def find_runs(folder: Path) -> list[Path]:
    """The run folders under `folder` (those with `logs/metrics.csv`), `folder` itself if it is one."""
    if (folder / "logs" / "metrics.csv").is_file():
        return [folder]
    return sorted(path.parents[1] for path in folder.glob("*/logs/metrics.csv"))


def format_table(rows: dict[str, dict]) -> str:
    """Rows (label -> results) as aligned text: one `metric value` line each for one run, else a table.

    A comparison keeps the held-out total and accuracy columns only, so that it fits a terminal.
    """
    if len(rows) == 1:
        ((label, row),) = rows.items()
        width = max(len(key) for key in row)
        return "\n".join([label, *(f"  {key:<{width}}  {_cell(value)}" for key, value in row.items())])
    columns = [
        key
        for key in dict.fromkeys(key for row in rows.values() for key in row)
        if not key.startswith("held_out/") or key.endswith(("total", "accuracy"))
    ]
    width = max([len(label) for label in rows] + [4])
    names = [
        c.removeprefix("held_out/").replace("/reward/", ":").replace("/greedy/", ":greedy_") for c in columns
    ]
    lines = [f"{'run':<{width}}  " + "  ".join(names)]
    for label, row in rows.items():
        cells = (f"{_cell(row.get(c)):>{len(n)}}" for c, n in zip(columns, names, strict=True))
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class PlotNotWritten(OSError):
    """The results were read but the plot could not be written; `rows` holds them for the table."""

    def __init__(self, rows: dict[str, dict], message: str):
        super().__init__(message)
        self.rows = rows


def report(
    folder: Path, labels: dict[Path, str] | None = None, notes: list[str] | None = None
) -> tuple[dict[str, dict], Path]:
    """Results of the run(s) in `folder` and the plot written: `curves.png` (one run) or `comparison.png`.

    What could not be read is left out of both and named in `notes`, one line each; a plot that cannot be
    written raises `PlotNotWritten`, which carries the results.
    """
    if not folder.exists():
        raise FileNotFoundError(f"'{folder}' does not exist; pass a run folder or a folder of runs")
    if (folder / "metrics.csv").is_file():
        raise FileNotFoundError(f"'{folder}' is a run's logs folder; pass the run folder '{folder.parent}'")
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"'{folder}' holds no run (no logs/metrics.csv in it or its subfolders)")
    labels = labels or {}
    names = {run: labels.get(run, run.name if run != folder else folder.name) for run in runs}
    rows = {names[run]: run_results(run, notes) for run in runs}
    curves = {names[run]: read_curves(run) for run in runs}
    single = len(runs) == 1 and runs[0] == folder
    path = folder / ("curves.png" if single else "comparison.png")
    try:
        return rows, plot_runs(curves, path, str(folder) if single else f"{folder} ({len(runs)} runs)")
    except OSError as error:  # a read-only copy of a run, a full disk: the table is still worth printing
        raise PlotNotWritten(
            rows, f"the plot '{path}' could not be written ({error.strerror or error})"
        ) from None


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: print the table and the plot's path."""
    parser = argparse.ArgumentParser(prog="python -m vrft.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a run folder, or a folder of runs (Hydra multirun)")
    args = parser.parse_args(argv)
    notes: list[str] = []
    plot_error = None
    try:
        rows, plot = report(args.folder, notes=notes)
    except FileNotFoundError as error:
        parser.exit(2, f"vrft: error: {error}\n")
    except PlotNotWritten as error:
        rows, plot_error = error.rows, error
    for note in notes:
        print(f"vrft: warning: {note}", file=sys.stderr)
    print(format_table(rows))
    if plot_error is not None:
        parser.exit(
            2, f"vrft: error: {plot_error}; the table above is complete: copy the run somewhere writable\n"
        )
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
