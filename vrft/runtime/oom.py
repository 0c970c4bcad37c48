"""Turning a CUDA out-of-memory error into a message that names the phase and what to lower.

The run's checkpoints are left as they are (nothing is deleted); the adapter as it was when memory ran
out is saved next to them, so no optimizer step is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vrft.models.policy import save_adapter
from vrft.models.sharded import is_sharded

log = logging.getLogger(__name__)

# What shrinks each phase, most effective first.
ADVICE = {
    "rollout": (
        "the KV cache and prefill of rollout_batch_size x group_size sequences: lower algorithm.group_size "
        "or algorithm.rollout_batch_size, algorithm.max_new_tokens or model.max_pixels; "
        "algorithm.rollout_engine=dequant holds no bf16 copy of the weights"
    ),
    "reference": (
        "the no-grad reference forward: lower algorithm.update_micro_batch_size or "
        "algorithm.logprob_chunk_size, or model.max_pixels"
    ),
    "update": (
        "activations of the policy update: lower algorithm.update_micro_batch_size or "
        "algorithm.logprob_chunk_size, set model.gradient_checkpointing=true, lower lora.r, or use "
        "optimizer=paged_adamw8bit"
    ),
    None: "the model and adapter themselves: choose a smaller precision (precision=int4) or a smaller model",
}


class OutOfMemoryInPhase(ValueError):
    """A CUDA OOM, explained: the phase that ran out and the settings that shrink it.

    A `ValueError` so the CLI prints it as one line, like other settings that do not fit.
    """

    def __init__(self, phase: str | None, detail: str, saved_adapter: Path | None, rank: int | None = None):
        self.phase = phase
        where = f"during the {phase} phase" if phase else "outside the GRPO phases (setup or optimizer step)"
        if (
            rank is not None
        ):  # a multi-process run: the rank that ran out (its phase may differ from the others')
            where = f"on rank {rank} {where}; every rank was stopped"
        saved = (
            f"; the adapter at that moment is saved in {saved_adapter} and existing checkpoints are kept"
            if saved_adapter
            else "; existing checkpoints are kept"
        )
        super().__init__(
            f"CUDA ran out of memory {where}: {detail.splitlines()[0] if detail else ''}\n"
            f"  what fills it: {ADVICE.get(phase, ADVICE[None])}{saved}\n"
            "  `python -m vrft.plan` with the same overrides predicts the peak before loading the model"
        )


def save_adapter_on_oom(module, run_dir: Path, step: int) -> Path | None:
    """Save the current adapter to `<run_dir>/adapter/oom-step-<step>` (never overwriting); None if impossible."""
    policy = getattr(module, "policy", None)
    if policy is None or not hasattr(policy, "save_pretrained"):
        return None
    if is_sharded(policy):
        return None  # gathering FSDP shards is a collective the other ranks are not in; the checkpoint stays
    folder = Path(run_dir) / "adapter" / f"oom-step-{step}"
    if folder.exists():
        return folder
    try:
        save_adapter(policy, folder)
    except Exception as error:  # saving must never hide the OOM itself
        log.warning("could not save the adapter after the OOM: %s", error)
        return None
    return folder


def explain_out_of_memory(
    error: BaseException, module, run_dir: Path, step: int, rank: int | None = None
) -> OutOfMemoryInPhase:
    """The `OutOfMemoryInPhase` for an OOM raised while training `module` (adapter saved first).

    `rank`: the rank of a multi-process run that ran out (None on one process); its adapter is the others'
    too at the last optimizer step, so it saves it.
    """
    tracker = getattr(module, "phases", None)
    phase = getattr(tracker, "current", None)
    saved = save_adapter_on_oom(module, run_dir, step)
    log.error("out of memory in phase %s at step %d", phase, step)
    return OutOfMemoryInPhase(phase, str(error), saved, rank)
