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

    def export(self, pl_module: L.LightningModule, name: str, state_dict: dict) -> Path:
        """Write the adapter of `state_dict` (the module's, as Lightning gathers it) to `<dirpath>/<name>`."""
        folder = self.dirpath / name
        policy_weights = {
            key.removeprefix("policy."): value
            for key, value in state_dict.items()
            if key.startswith("policy.")
        }
        save_adapter(pl_module.policy, folder, policy_weights)
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
        # Callbacks run before the module's hook keeps only the adapter: the state dict is whole here, and
        # under FSDP it is the one the strategy gathered on rank 0 for the checkpoint.
        if trainer.is_global_zero:
            self.export(pl_module, f"step-{trainer.global_step}", checkpoint["state_dict"])

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank: under FSDP gathering the weights is a collective (elsewhere it returns references).
        state_dict = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            folder = self.export(pl_module, "final", state_dict)
            log.info("LoRA adapter (peft format) written to %s", folder)
