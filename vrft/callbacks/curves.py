"""`<run>/curves.png` at every checkpoint and at the end of fit: the run's curves without a dashboard."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from typing_extensions import override

from vrft.report import plot_runs, read_curves

log = logging.getLogger(__name__)


class CurvesPlot(L.Callback):
    """Plot reward by component, KL, completion length and memory from `<dirpath>/logs/metrics.csv`.

    Args:
        dirpath: run folder (reads `logs/metrics.csv`, writes `curves.png`).
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def plot(self) -> Path | None:
        curves = read_curves(self.dirpath)
        if not curves:
            return None
        return plot_runs({self.dirpath.name: curves}, self.dirpath / "curves.png", str(self.dirpath))

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.plot()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and (path := self.plot()) is not None:
            log.info("curves written to %s", path)
