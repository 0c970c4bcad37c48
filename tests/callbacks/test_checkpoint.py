"""Checkpoints: a run resumed into its own folder keeps last.ckpt its newest checkpoint."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vrft.callbacks import Checkpoints


class TwoStepsABatch(BoringModel):
    """Two optimizer steps per batch, as GRPO's update with num_iterations=2 takes."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            self.manual_backward(self(batch).sum())
            optimizer.step()
            optimizer.zero_grad()


def fit(folder, max_steps: int, ckpt_path=None, every: int = 1, model=None) -> None:
    checkpoints = Checkpoints(
        dirpath=str(folder), filename="step-{step}", every_n_train_steps=every, save_last=True, save_top_k=-1
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
    trainer.fit(model or BoringModel(), ckpt_path=ckpt_path)


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


def test_the_runs_last_step_is_checkpointed_between_due_checkpoints(tmp_path):
    # Lightning wrote last.ckpt at the end only where it had never written one: it stayed at step 4 of 5
    fit(tmp_path / "run", 5, every=2)
    assert step_of(tmp_path / "run" / "last.ckpt") == 5
    names = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert names == ["last.ckpt", "step-step=2.ckpt", "step-step=4.ckpt", "step-step=5.ckpt"]
    fit(tmp_path / "run", 7, ckpt_path=tmp_path / "run" / "last.ckpt", every=2)  # trains steps 6 and 7 on
    assert step_of(tmp_path / "run" / "last.ckpt") == 7
    assert (tmp_path / "run" / "step-step=6.ckpt").is_file() and (
        tmp_path / "run" / "step-step=7.ckpt"
    ).is_file()


def test_a_run_ending_on_a_due_checkpoint_writes_it_once(tmp_path):
    fit(tmp_path / "run", 4, every=2)
    names = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert names == ["last.ckpt", "step-step=2.ckpt", "step-step=4.ckpt"]
    assert step_of(tmp_path / "run" / "last.ckpt") == 4


def test_a_batch_of_several_steps_passing_a_due_step_is_saved(tmp_path):
    # steps 2, 4, 6, 8 with a checkpoint due every 3: Lightning saved only at 6, the one multiple it landed on
    fit(tmp_path / "run", 8, every=3, model=TwoStepsABatch())
    names = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert names == ["last.ckpt", "step-step=4.ckpt", "step-step=6.ckpt", "step-step=8.ckpt"]
    assert step_of(tmp_path / "run" / "last.ckpt") == 8
