"""Writes the LoRA adapter in peft format next to every Lightning checkpoint and at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from typing_extensions import override

from vrft.models.policy import save_adapter

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Save the adapter so `PeftModel.from_pretrained(base, folder)` loads it in plain transformers.

    Args:
        dirpath: folder for the adapters; `step-<N>/` per checkpoint and `final/` at the end of fit.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def export(self, pl_module: L.LightningModule, name: str) -> Path:
        folder = self.dirpath / name
        save_adapter(pl_module.policy, folder)
        pl_module.processor.save_pretrained(folder) if hasattr(
            pl_module.processor, "save_pretrained"
        ) else None
        return folder

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.export(pl_module, f"step-{trainer.global_step}")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            folder = self.export(pl_module, "final")
            log.info("LoRA adapter (peft format) written to %s", folder)
