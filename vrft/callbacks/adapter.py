"""Writes the LoRA adapter in peft format next to every Lightning checkpoint and at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from typing_extensions import override

from vrft.models.policy import save_adapter
from vrft.models.processor import save_processor

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Save the adapter so `PeftModel.from_pretrained(base, folder)` loads it in plain transformers.

    Adapter folders hold the adapter only (about 0.5 MB for the tiny model); the processor, which never
    changes during training, is written once per run (18 MB of tokenizer files would otherwise sit next to
    every adapter).

    Args:
        dirpath: folder for the adapters; `step-<N>/` per checkpoint and `final/` at the end of fit.
        processor_dirpath: where the processor is saved at fit start (None: not saved).
    """

    def __init__(self, dirpath: str, processor_dirpath: str | None = None):
        self.dirpath = Path(dirpath)
        self.processor_dirpath = Path(processor_dirpath) if processor_dirpath else None

    def export(self, pl_module: L.LightningModule, name: str) -> Path:
        folder = self.dirpath / name
        save_adapter(pl_module.policy, folder)
        return folder

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        processor = getattr(pl_module, "processor", None)
        if (
            trainer.is_global_zero
            and self.processor_dirpath is not None
            and hasattr(processor, "save_pretrained")
        ):
            save_processor(processor, self.processor_dirpath)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, f"step-{trainer.global_step}")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            folder = self.export(pl_module, "final")
            log.info("LoRA adapter (peft format) written to %s", folder)
