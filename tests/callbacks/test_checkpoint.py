"""Checkpoints: a run resumed into its own folder keeps last.ckpt its newest checkpoint."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vrft.callbacks import Checkpoints


def fit(folder, max_steps: int, ckpt_path=None) -> None:
    checkpoints = Checkpoints(
        dirpath=str(folder), filename="step-{step}", every_n_train_steps=1, save_last=True, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_resume_from_the_first_checkpoint_or_a_moved_folder_updates_last_ckpt(tmp_path):
    fit(tmp_path / "run", 3)
    # the first checkpoint records no last.ckpt yet: Lightning wrote the resumed run's as last-v1.ckpt
    fit(tmp_path / "run", 4, ckpt_path=tmp_path / "run" / "step-step=1.ckpt")
    assert step_of(tmp_path / "run" / "last.ckpt") == 4
    (tmp_path / "run").rename(tmp_path / "moved")  # copied off a cluster: its record names the old folder
    fit(tmp_path / "moved", 5, ckpt_path=tmp_path / "moved" / "last.ckpt")
    assert step_of(tmp_path / "moved" / "last.ckpt") == 5
    names = sorted(path.name for path in (tmp_path / "moved").iterdir())
    assert names == ["last.ckpt", *(f"step-step={step}.ckpt" for step in range(1, 6))]  # no -v1 copies
