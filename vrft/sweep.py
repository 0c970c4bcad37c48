"""A Hydra callback that tabulates a multirun: `<sweep dir>/summary.csv` and `<sweep dir>/comparison.png`.

The table is rewritten after every job (an interrupted sweep still has one row per finished job) and once
more at the end. Each row: the job's overrides, its final train metrics, its held-out results, its peak
memory and seconds per optimizer step, read back from the job's folder by `vrft.report`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from vrft.report import find_runs, plot_runs, read_curves, run_results

log = logging.getLogger(__name__)


def job_overrides(run_dir: Path) -> str:
    """The command-line overrides of the job in `run_dir` (from Hydra's `.hydra/overrides.yaml`)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(path)) if path.is_file() else ""


def write_sweep_summary(sweep_dir: Path) -> Path | None:
    """Write `summary.csv` and `comparison.png` for the jobs in `sweep_dir`; returns the CSV (None: no job)."""
    runs = find_runs(sweep_dir)
    if not runs:
        return None
    rows = [{"job": run.name, "overrides": job_overrides(run), **run_results(run)} for run in runs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = sweep_dir / "summary.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_runs({run.name: read_curves(run) for run in runs}, sweep_dir / "comparison.png", str(sweep_dir))
    return path


class SweepSummary(Callback):
    """Hydra callback (`hydra.callbacks`): the sweep's summary after each job and at the end of a multirun."""

    @override
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            write_sweep_summary(Path(hydra_cfg.sweep.dir))

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_sweep_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"sweep summary: {path} (plot: {path.with_name('comparison.png')})")
