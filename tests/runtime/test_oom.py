"""A CUDA OOM during training: the message names the phase and what to lower, checkpoints survive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.support import LENGTH_REWARD
from vrft.modules.grpo import GRPOModule
from vrft.rollout.engines import HFGenerate
from vrft.runtime.oom import OutOfMemoryInPhase
from vrft.train import fit

CONF = str(Path(__file__).resolve().parents[2] / "conf")
FAST = [
    "warm_start=none",
    "trainer.max_steps=3",
    "algorithm.max_new_tokens=4",
    "algorithm.group_size=2",
    "algorithm.rollout_batch_size=2",
    "algorithm.prompts_per_step=2",
    "algorithm.update_micro_batch_size=2",
    "data.synthetic.num_train=8",
    "data.synthetic.num_test=4",
    "callbacks.checkpoint.every_n_train_steps=1",
    "lora.r=4",
    "lora.alpha=8",
    "~callbacks.progress",
    "~callbacks.samples",
    *LENGTH_REWARD,
]


def fail_on_second_step(monkeypatch, owner, name, when=lambda: True):
    """Patch `owner.name` to raise a CUDA OOM once the first optimizer step has been checkpointed."""
    original = getattr(owner, name)
    calls = {"step_done": False}

    def patched(self, *args, **kwargs):
        if calls["step_done"] and when():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    original_update = GRPOModule.policy_update

    def update_then_arm(self, rollouts):
        original_update(self, rollouts)
        calls["step_done"] = True

    monkeypatch.setattr(GRPOModule, "policy_update", update_then_arm)


PHASES = {
    "rollout": (HFGenerate, "generate", lambda: True, "algorithm.group_size"),
    "reference": (GRPOModule, "rollout_logprobs", lambda: True, "reference forward"),
    "update": (GRPOModule, "sequence_logprobs", torch.is_grad_enabled, "update_micro_batch_size"),
}


@pytest.mark.parametrize("phase", PHASES)
def test_oom_names_the_phase_and_keeps_checkpoints(phase, tmp_path, monkeypatch):
    owner, name, when, advice = PHASES[phase]
    fail_on_second_step(monkeypatch, owner, name, when)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=FAST)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(OutOfMemoryInPhase) as caught:
        fit(cfg)
    error = caught.value
    assert error.phase == phase
    assert f"CUDA ran out of memory during the {phase} phase" in str(error)
    assert advice in str(error)
    assert "existing checkpoints are kept" in str(error)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("step-") for name in checkpoints)
    assert (tmp_path / "adapter" / "oom-step-1" / "adapter_config.json").is_file()


def test_oom_outside_the_phases_points_at_the_model_size():
    error = OutOfMemoryInPhase(None, "CUDA out of memory.", None)
    assert "outside the GRPO phases" in str(error) and "precision=int4" in str(error)


def test_a_rank_of_a_multi_process_run_names_itself_and_its_phase():
    error = OutOfMemoryInPhase("update", "CUDA out of memory. Tried to allocate 2.00 GiB", None, rank=1)
    first = str(error).splitlines()[0]
    assert first.startswith(
        "CUDA ran out of memory on rank 1 during the update phase; every rank was stopped"
    )
    assert "on rank" not in str(OutOfMemoryInPhase("update", "CUDA out of memory", None))
