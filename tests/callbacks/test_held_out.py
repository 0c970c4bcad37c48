"""The held-out check: which engine generates its completions, and `held_out.json` after each measurement."""

from __future__ import annotations

import contextlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vrft.callbacks import HeldOutReward
from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.grpo import GRPOModule
from vrft.modules.losses import SequenceMeanLoss
from vrft.modules.scoring import WeightedReward
from vrft.rewards import format_reward

ROWS = [
    {
        "image": Image.new("RGB", (112, 112), (255, 0, 0)),
        "problem": "Colour?",
        "solution": "<answer>red</answer>",
    },
    {
        "image": Image.new("RGB", (56, 84), (0, 0, 255)),
        "problem": "Hue?",
        "solution": "<answer>blue</answer>",
    },
]


def tiny_grpo() -> GRPOModule:
    torch.manual_seed(0)
    module = GRPOModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(r=4, alpha=8),
        loss=SequenceMeanLoss(beta=0.0),
        rewards={"format": WeightedReward(format_reward)},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        group_size=2,
        max_new_tokens=6,
    )
    module.build_policy(torch.float32)
    return module


def test_completions_come_from_the_chosen_engine_and_plain_generate_by_default():
    module = tiny_grpo()
    assert HeldOutReward().engine is None  # plain generate: the training-time model itself
    check = HeldOutReward(samples_per_row=2, rollout_engine="dequant")
    metrics = check.measure(module, ROWS)
    assert set(metrics) == {"reward/format", "reward/total"}  # no evaluator: rewards only
    # The last call was the greedy pass of the one batch: one completion per row, decoded by the engine.
    assert check.engine.last_logprobs.shape[0] == len(ROWS)
    assert check.engine.last_stats["steps"] >= 1


def fake_trainer(global_step: int) -> SimpleNamespace:
    forward_context = contextlib.nullcontext
    return SimpleNamespace(
        is_global_zero=True,
        global_step=global_step,
        precision_plugin=SimpleNamespace(forward_context=forward_context),
    )


def run_check(folder, global_step: int, reward: float, monkeypatch) -> HeldOutReward:
    """A held-out check over a run that starts at `global_step`; the policy scores `reward` each time."""
    check = HeldOutReward(dirpath=str(folder))
    monkeypatch.setattr(check, "rows", lambda trainer: ROWS)
    monkeypatch.setattr(check, "measure", lambda module, rows: {"reward/total": reward})
    trainer, module = fake_trainer(global_step), SimpleNamespace(rewards=None)
    check.on_train_start(trainer, module)
    check.on_train_end(trainer, module)
    return check


def test_a_run_resumed_into_its_folder_keeps_the_before_measured_before_grpo(tmp_path, monkeypatch, capsys):
    run_check(
        tmp_path, 0, 0.5, monkeypatch
    )  # the run before it was stopped (its "after": a checkpoint later)
    resumed = run_check(tmp_path, 2, 0.75, monkeypatch)
    assert resumed.results["before"] == {"reward/total": 0.5}  # not the step-2 checkpoint's 0.75
    assert json.loads((tmp_path / "held_out.json").read_text())["before"] == {"reward/total": 0.5}
    assert "  metric                  before   after   change" in capsys.readouterr().out


def test_a_run_resumed_elsewhere_says_its_before_is_the_checkpoints(tmp_path, monkeypatch, capsys):
    resumed = run_check(tmp_path, 2, 0.75, monkeypatch)
    assert resumed.results["before"] == {"reward/total": 0.75}
    assert json.loads((tmp_path / "held_out.json").read_text())["before_step"] == 2
    assert "  metric                  step 2   after   change" in capsys.readouterr().out


def test_held_out_json_is_written_after_each_measurement(tmp_path, monkeypatch):
    check = HeldOutReward(dirpath=str(tmp_path), measure_merged=True, rollout_engine="bf16_copy")
    path = tmp_path / "held_out.json"
    written_before: dict[str, list[str]] = {}

    def measure(name):
        def fake(*args):
            # What a run stopped now would leave behind.
            written_before[name] = list(json.loads(path.read_text())) if path.exists() else []
            return {"reward/total": float(len(written_before))}

        return fake

    trainer = fake_trainer(global_step=0)
    module = SimpleNamespace(rewards=None)
    monkeypatch.setattr(check, "rows", lambda trainer: ROWS)
    monkeypatch.setattr(check, "measure", measure("before"))
    check.on_train_start(trainer, module)
    monkeypatch.setattr(check, "measure", measure("after"))
    monkeypatch.setattr(check, "measure_deployed", measure("merged"))
    check.on_train_end(trainer, module)
    settings = ["split", "rows", "rollout_engine"]
    assert written_before == {
        "before": [],
        "after": [*settings, "before"],
        "merged": [*settings, "before", "after"],
    }
    final = json.loads(path.read_text())
    assert final["rollout_engine"] == "bf16_copy" and list(final)[3:] == ["before", "after", "merged"]


def test_held_out_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # written in place, a stop or a full disk mid-write left a cut file that vrft.report could not read
    check = HeldOutReward(dirpath=str(tmp_path))
    check._rows, check.results = ROWS, {"before": {"reward/total": 0.5}}
    trainer = SimpleNamespace(is_global_zero=True)
    check.write(trainer)
    written = (tmp_path / "held_out.json").read_text()

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    check.results["after"] = {"reward/total": 1.0}
    with pytest.raises(OSError, match="No space left"):
        check.write(trainer)
    assert (tmp_path / "held_out.json").read_text() == written
    assert [p.name for p in tmp_path.iterdir()] == ["held_out.json"]  # no partial file left behind
