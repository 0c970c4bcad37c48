"""The run's checkpoints: Lightning's `ModelCheckpoint`, which also saves when a SIGTERM stops the run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vrft.runtime.interrupt import note_saved


class Checkpoints(ModelCheckpoint):
    """`ModelCheckpoint` that also saves the last step of the run, and the last finished step when a SIGTERM
    stops it.

    At the end of training Lightning writes `last.ckpt` only where it never wrote one: a 90-step run with
    `every_n_train_steps=20` ended with `last.ckpt` at step 80, and steps 81-90 were only in the exported
    adapter, so a resume to train on (a larger `trainer.max_steps`) went back ten steps. `on_train_end` saves
    the final step as the others (`step-step=90.ckpt` and `last.ckpt`) where no checkpoint has it yet; and a
    batch of several optimizer steps (`algorithm.num_iterations`) that passes a due step is saved at its end.

    A scheduler's kill (or a preemption) reaches Lightning as a SIGTERM: it finishes the running optimizer
    step and raises `SIGTERMException`. Without this, the steps since the last `every_n_train_steps`
    checkpoint were lost. Lightning's own `save_on_exception` saves on *any* exception, including an
    out-of-memory error or a failure in the middle of a step, whose half-done state a resume must not start
    from; so the save is kept for the SIGTERM alone, where the step has finished (GRPO optimizes manually:
    one `training_step` is one whole optimizer step). A first Ctrl-C stops the same way
    (`vrft.runtime.interrupt`). The checkpoint written is recorded for the CLI's last line; before any step
    has finished there is nothing to save.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("save_on_exception", True)
        # A resumed run writes its checkpoints under their own names. With Lightning's version counter, a name
        # already taken (a step the resumed run trains again; last.ckpt after a resume from the first
        # checkpoint, or in a moved run folder, where the checkpoint's own record of last.ckpt differs) got
        # `-v1`: last.ckpt kept the older step, and the next resume from it, as vrft says to, silently went
        # back and trained those steps again. A fresh run never overwrites (vrft.resume.check_fresh_run).
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)
        self._step_at_batch_start = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        # GRPO with num_iterations > 1 takes that many optimizer steps in one batch, and Lightning saves only where
        # the step is a multiple of every_n_train_steps: 3 iterations and every 20 steps saved every 60. A batch
        # whose steps pass a due step without landing on it is saved at its end.
        every, step = self._every_n_train_steps, trainer.global_step
        passed = every >= 1 and step % every != 0 and step // every > self._step_at_batch_start // every
        if passed and not self._should_skip_saving_checkpoint(trainer):
            self._save_step(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_step(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_step(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.global_step == 0:
            return
        super().on_exception(trainer, pl_module, exception)
        path = self.last_model_path or self.format_checkpoint_name(self._monitor_candidates(trainer))
        if path and Path(path).is_file():
            note_saved(trainer.global_step, Path(path))
