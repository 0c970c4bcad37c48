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
        """Write `curves.png`; None when there is nothing to plot or it cannot be written.

        The plot is a convenience: it runs while Lightning builds a checkpoint, so an error here (a full disk,
        a `curves.png` that is a folder) would end the run and lose that checkpoint. It is logged instead.
        """
        curves = read_curves(self.dirpath)
        if not curves:
            return None
        path = self.dirpath / "curves.png"
        try:
            return plot_runs({self.dirpath.name: curves}, path, str(self.dirpath))
        except OSError as error:
            log.warning(
                "curves not written to %s (%s); `python -m vrft.report %s` draws them later",
                path,
                error.strerror or error,
                self.dirpath,
            )
            return None

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.plot()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and (path := self.plot()) is not None:
            log.info("curves written to %s", path)
