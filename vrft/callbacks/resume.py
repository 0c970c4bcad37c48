"""Writes into every checkpoint the settings that a run resuming from it must share."""

from __future__ import annotations

from typing import Any

import lightning as L


class RunSettingsInCheckpoint(L.Callback):
    """Stores `settings` (`vrft.resume.resume_settings`) under `checkpoint[key]`.

    `vrft.resume.check_resume` compares them with the resuming run before any weight loads, so that a
    different LoRA rank, model or precision is one line naming the key instead of a shape mismatch deep
    inside `load_state_dict`, and another optimizer or rollout setting is not silently trained with. Plain
    Python values only: the checkpoint still loads with `weights_only=True`.
    """

    def __init__(self, settings: dict[str, Any], key: str = "vrft_resume"):
        self.settings = dict(settings)
        self.key = key

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.key] = dict(self.settings)
