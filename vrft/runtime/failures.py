"""Failures of a run that are not the user's input: named with the phase, the step and the checkpoint that
is safe to resume from, and exit code 1 from the CLI (a bad setting is exit 2, `vrft.cli.user_errors`).

An exception raised while a GRPO phase runs (rollout, reference, update) comes from inside the model or a
library: the config and data were already checked before the first step. Calling it a user error would
send the user hunting for a setting that does not exist.
"""

from __future__ import annotations

from pathlib import Path


class TrainingFailure(RuntimeError):
    """Training stopped for a reason that is not a setting: where it happened and what is safe to keep.

    Args:
        phase: the GRPO phase that was running (`vrft.runtime.phases.PHASES`), or None outside them.
        step: the optimizer step that failed (1-based).
        checkpoint: the last complete checkpoint (written before the failure), or None if there is none.
        detail: what went wrong, one line.
    """

    def __init__(self, phase: str | None, step: int, checkpoint: str | None, detail: str):
        self.phase, self.step, self.checkpoint, self.detail = phase, step, checkpoint, detail
        where = f"the {phase} phase of step {step}" if phase else f"step {step}"
        safe = (
            f"the last complete checkpoint is {checkpoint} (resume with ckpt_path={checkpoint})"
            if checkpoint
            else "no checkpoint was written before it"
        )
        super().__init__(f"training failed in {where}: {detail}\n  {safe}")


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint the trainer's checkpoint callbacks finished writing, if any is on disk."""
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path and Path(path).is_file():
            return str(path)
    return None


def internal_failure(error: BaseException, module, trainer) -> TrainingFailure | None:
    """`error` as a `TrainingFailure` when it was raised inside a GRPO phase; None otherwise (let it be)."""
    tracker = getattr(module, "phases", None)
    phase = getattr(tracker, "current", None)
    if phase is None or isinstance(error, TrainingFailure):
        return None
    detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return TrainingFailure(
        phase,
        trainer.global_step + 1,
        last_checkpoint(trainer),
        f"{detail} (an internal error, not a setting)",
    )
