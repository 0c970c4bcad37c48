"""The real CLI on the tiny model: a short run, its outputs, resume, and the exported adapter."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from tests.support import LENGTH_REWARD
from vrft.models.presets import tiny_checkpoint
from vrft.train import fit

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# Small enough for a few seconds per optimizer step on 2 CPU cores.
FAST = [
    "warm_start=none",
    "trainer.max_steps=2",
    "algorithm.max_new_tokens=8",
    "algorithm.group_size=2",
    "algorithm.rollout_batch_size=2",
    "algorithm.prompts_per_step=2",
    "algorithm.update_micro_batch_size=2",
    "data.synthetic.num_train=8",
    "data.synthetic.num_test=4",
    "callbacks.checkpoint.every_n_train_steps=1",
    "lora.r=4",
    "lora.alpha=8",
    "optimizer.lr=1e-2",
    "~callbacks.progress",
    *LENGTH_REWARD,
]


def run_cli(
    run_dir: Path, *overrides: str, module: str = "vrft.train", env: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", **(env or {}))
    command = [sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *FAST, *overrides]
    root = Path(__file__).resolve().parents[1]
    # cwd = the repository root, so that the CLI process can import `tests.support`.
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=root)


def metric_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logs" / "metrics.csv").open() as file:
        return [row for row in csv.DictReader(file) if row.get("train/reward")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "first"
    result = run_cli(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder: {run_dir}" in result.stdout
    return run_dir


def test_cli_run_writes_metrics_checkpoints_adapter_and_summary(first_run):
    rows = metric_rows(first_run)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for key in (
        "train/kl",
        "reward/format",
        "reward/accuracy",
        "train/completion_length",
        "memory/update_peak_gb",
    ):
        assert rows[-1][key] != ""
    assert (first_run / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((first_run / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    adapter = load_file(first_run / "adapter" / "final" / "adapter_model.safetensors")
    # peft starts lora_B at zero: a non-zero lora_B means the adapter trained.
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (first_run / "samples.jsonl").read_text().strip()


def test_resume_continues_step_count_and_optimizer_state(first_run, tmp_path):
    checkpoint = torch.load(first_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    # Only adapter weights are stored: the frozen base comes from the model folder again.
    assert all("lora_" in key for key in checkpoint["state_dict"])
    adam_step = next(iter(checkpoint["optimizer_states"][0]["state"].values()))["step"]
    assert float(adam_step) == 2

    resumed = tmp_path / "resumed"
    result = run_cli(resumed, f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(r["step"]) for r in metric_rows(resumed)] == [3]
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert float(next(iter(last["optimizer_states"][0]["state"].values()))["step"]) == 3


def test_resume_with_another_lora_rank_is_refused_before_loading(first_run, tmp_path):
    checkpoint = first_run / "checkpoints" / "last.ckpt"
    result = run_cli(tmp_path / "other_rank", f"ckpt_path={checkpoint}", "lora.r=8", "trainer.max_steps=3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was trained with lora.r=4 but this run has lora.r=8; resume with lora.r=4" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_mid_epoch_and_at_an_epoch_end_matches_a_straight_run(tmp_path):
    # FAST: 8 training rows, 2 prompts per step -> 4 steps per epoch. Resuming after step 3 is mid-epoch
    # (the loader must continue with the epoch's 4th batch), after step 4 at an epoch end.
    straight, first = tmp_path / "straight", tmp_path / "first"
    for run_dir, steps in ((straight, 6), (first, 3)):
        result = run_cli(run_dir, f"trainer.max_steps={steps}")
        assert result.returncode == 0, result.stderr[-3000:]
    expected = {int(r["step"]): r for r in metric_rows(straight)}
    for start, checkpoint in (
        (3, first / "checkpoints" / "last.ckpt"),
        (4, straight / "checkpoints" / "step-step=4.ckpt"),
    ):
        resumed = tmp_path / f"resumed-{start}"
        result = run_cli(
            resumed, f"ckpt_path='{checkpoint}'", "trainer.max_steps=6"
        )  # quoted: '=' in the name
        assert result.returncode == 0, result.stderr[-3000:]
        rows = metric_rows(resumed)
        assert [int(r["step"]) for r in rows] == list(range(start + 1, 7))
        for row in rows:
            # Same prompts, same RNG state, same weights: the same computation on the same CPU. The CSV
            # holds floats printed in full, so only a change of summation order could move them (1e-6).
            for key in ("train/loss", "train/reward", "train/kl"):
                assert float(row[key]) == pytest.approx(
                    float(expected[int(row["step"])][key]), rel=1e-6, abs=1e-7
                ), f"{key} at step {row['step']} after resuming from step {start}"


def test_bad_input_is_one_line_naming_the_fix(tmp_path):
    result = run_cli(tmp_path / "bad", "algorithm.group_size=1")
    assert result.returncode == 2
    assert "vrft: error: algorithm.group_size=1" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli(tmp_path / "bad2", "model=local", "model.name_or_path=/no/such/model")
    assert missing.returncode == 2
    assert "model.name_or_path='/no/such/model' does not exist" in missing.stderr


def test_in_process_fit_trains_lora_only_and_adapter_reloads(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=FAST)
    cfg.run_dir = str(tmp_path)
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    trainer, module, _ = fit(cfg)
    assert trainer.global_step == 2

    trained = dict(module.policy.get_base_model().named_parameters())
    for name, original in base.named_parameters():
        # peft moves the parameters of each adapted Linear under `.base_layer`.
        prefix, leaf = name.rsplit(".", 1)
        current = trained[name] if name in trained else trained[f"{prefix}.base_layer.{leaf}"]
        assert torch.equal(current, original), f"frozen weight {name} changed"
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)

    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter" / "final").eval()
    module.policy.eval()
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 419, 30, 151645]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.policy(input_ids=ids).logits)


def test_evaluate_cli_writes_predictions_and_metrics(first_run, tmp_path):
    out = tmp_path / "eval"
    adapter = first_run / "adapter" / "final"
    result = run_cli(
        out,
        f"adapter={adapter}",
        "include_base=false",
        "split=test",
        "max_rows=4",
        "max_new_tokens=24",
        module="vrft.evaluate",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["rows"] == 4 and list(report["results"]) == [str(adapter)]
    assert 0.0 <= report["results"][str(adapter)]["accuracy"] <= 1.0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {"completion", "solution", "answer", "reward"} <= set(predictions[0])


def test_sft_algorithm_logs_loss_and_writes_checkpoints_and_adapter(tmp_path):
    run_dir = tmp_path / "sft"
    command = [sys.executable, "-m", "vrft.train", f"hydra.run.dir={run_dir}", "algorithm=sft"]
    command += ["algorithm.batch_size=2", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3"]
    command += ["data.synthetic.num_train=8", "data.synthetic.num_test=4", "lora.r=4", "lora.alpha=8"]
    command += ["~callbacks.progress"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (run_dir / "logs" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["train/target_tokens"]) > 0 and float(r["train/loss"]) > 0 for r in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "adapter" / "final" / "adapter_config.json").is_file()
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["global_step"] == 3


def test_a_sweeper_that_optimises_a_metric_the_run_did_not_log_is_named():
    # hparams_search=tiny_optuna with a misspelt optimized_metric trained the trial, then failed inside the
    # sweeper ("Return value must be float-castable. Got 'None'") with a traceback naming no metric
    from omegaconf import OmegaConf

    from vrft.train import optimized_value

    metrics = {"train/reward": 1.5, "train/loss": 0.1}
    cfg = OmegaConf.create({"optimized_metric": "train/rewrd"})
    optuna = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    with pytest.raises(ValueError) as error:
        optimized_value(cfg, metrics, optuna)
    assert "optimized_metric='train/rewrd' is not a metric this run logged" in str(error.value)
    assert "set optimized_metric to one of: train/loss, train/reward" in str(error.value)
    assert optimized_value(cfg, metrics, None) is None  # a single run or a grid: nothing optimises it
    assert optimized_value(OmegaConf.create({"optimized_metric": "train/reward"}), metrics, optuna) == 1.5
