"""A rich progress bar whose total counts training batches even when optimizer steps accumulate several."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` that converts `max_steps` (optimizer steps) into batches.

    Under manual optimization one optimizer step takes `batches_per_step` training batches (rollouts), so
    Lightning's own total (remaining optimizer steps) runs out long before training ends.
    """

    @override
    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        per_step = getattr(trainer.lightning_module, "batches_per_step", 1)
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) * per_step
            return min(trainer.num_training_batches, remaining)
        return trainer.num_training_batches
