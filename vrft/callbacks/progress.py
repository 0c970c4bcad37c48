"""One rich progress bar for the whole run, counting optimizer steps, and room on it for other work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` whose one bar runs from the run's first to its last optimizer step.

    Lightning's own bar counts training batches per epoch ("Epoch 0/-2" when `max_epochs=-1`, and batches,
    not optimizer steps, under manual optimization). This one counts `trainer.global_step` up to
    `trainer.max_steps`, so a resumed run starts where it stopped (e.g. 2/3).

    Args:
        description: the bar's label.
    """

    def __init__(self, description: str = "train", **kwargs):
        super().__init__(**kwargs)
        self.description = description

    @override
    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        return trainer.num_training_batches * max(trainer.max_epochs or 1, 1)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        return self.description

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version id (W&B's run id) says nothing about training
        return metrics

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_progress_bar_id is None:  # the one bar of the run: made once, never reset per epoch
            super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


@contextlib.contextmanager
def progress_task(trainer: L.Trainer | None, description: str, total: int) -> Iterator:
    """A bar for work inside fit (the held-out check) on the run's live display; yields `advance(n=1)`.

    Rich allows one live display at a time, so the task joins the run's `StepProgressBar` and is removed
    afterwards; without one (progress bar off) nothing is shown.
    """
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    progress = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
    if progress is None:
        yield lambda n=1: None
        return
    task = progress.add_task(description, total=total)
    try:
        yield lambda n=1: (progress.advance(task, n), bar.refresh())
    finally:
        progress.remove_task(task)
