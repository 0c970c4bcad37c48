"""Sample completions per optimizer step: a JSONL file always, a W&B table when W&B logs the run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override


class CompletionSamples(L.Callback):
    """Append the module's latest completions to `<dirpath>/samples.jsonl` and to a W&B table.

    Args:
        dirpath: run folder.
        every_n_steps: write samples every this many optimizer steps.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1):
        self.path = Path(dirpath) / "samples.jsonl"
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self._table_rows: list[list] = []

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            step == self._last_step
            or step % self.every_n_steps
            or not pl_module.samples
            or not trainer.is_global_zero
        ):
            return
        self._last_step = step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            for sample in pl_module.samples:
                file.write(json.dumps({"step": step, **sample}) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._table_rows += [
                    [step, s["problem"], s["completion"], s["solution"], s["reward"]]
                    for s in pl_module.samples
                ]
                logger.log_table(
                    "samples",
                    columns=["step", "problem", "completion", "solution", "reward"],
                    data=self._table_rows,
                )
