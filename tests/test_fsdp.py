"""Lightning's FSDP strategy on CPU (gloo): two processes holding half of the tiny model each train the
adapter that one process trains.

Built as `tests/test_distributed.py` is: the two-process run goes through the real CLI (Lightning's launcher
starts rank 1), the one-process reference runs in this process with the same global batch and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import FSDPPrecision
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.test_distributed import DDP_FAST, metric_rows, one_process
from tests.test_train_cli import CONF, run_cli
from vrft.models.presets import tiny_checkpoint
from vrft.precision import Bf16Precision
from vrft.precision.fsdp import fsdp_precision_config
from vrft.runtime.sharding import in_root_forward

FSDP_TWO_RANKS = ["trainer.devices=2", "trainer.strategy=fsdp"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "two"
    tiny_checkpoint()  # built once here, not by two ranks racing into a cold cache
    result = run_cli(run_dir, *DDP_FAST, *FSDP_TWO_RANKS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_fsdp_processes_train_the_adapter_one_process_trains(fsdp_run, tmp_path):
    trainer, _, _ = one_process(tmp_path / "one")
    assert trainer.global_step == 2
    for name in ("step-1", "step-2", "final"):
        one = load_file(tmp_path / "one" / "adapter" / name / "adapter_model.safetensors")
        two = load_file(fsdp_run / "adapter" / name / "adapter_model.safetensors")
        assert one.keys() == two.keys()
        for key in one:
            # The same sampled tokens (rollouts are seeded by their rows) and the same fp32 weights, gathered
            # before each use: only the order of fp32 additions differs (a gradient reduce-scattered from two
            # half-steps, a grad norm summed from two shards). Measured: step 1 bit-identical, 6e-10 after
            # step 2; the DDP test's bound holds with three orders of magnitude to spare.
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)  # it did train
    # The summary counts the model's parameters, not rank 0's shard of them.
    one_summary, two_summary = (
        json.loads((run / "run_summary.json").read_text()) for run in (tmp_path / "one", fsdp_run)
    )
    for key in ("trainable_parameters", "total_parameters"):
        assert two_summary[key] == one_summary[key], key
    one_rows, two_rows = metric_rows(tmp_path / "one"), metric_rows(fsdp_run)
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == ["1", "2"]
    for key in (
        "train/reward",
        "train/loss",
        "train/completion_length",
        "train/kl",
        "train/lr",
        "train/grad_norm",
    ):
        for one_row, two_row in zip(one_rows, two_rows, strict=True):
            assert float(two_row[key]) == pytest.approx(float(one_row[key]), rel=1e-5, abs=1e-7), key


def adapter(run_dir, name: str) -> dict:
    return load_file(run_dir / "adapter" / name / "adapter_model.safetensors")


def test_an_fsdp_checkpoint_resumes_on_one_process_and_on_two_fsdp_processes(fsdp_run, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "last.ckpt"
    # Written in the unsharded format: one process without a strategy resumes it as it would its own.
    trainer, _, _ = one_process(tmp_path / "one", f"ckpt_path={checkpoint}", "trainer.max_steps=3")
    assert trainer.global_step == 3
    result = run_cli(
        tmp_path / "two", *DDP_FAST, *FSDP_TWO_RANKS, f"ckpt_path={checkpoint}", "trainer.max_steps=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metric_rows(tmp_path / "two")] == ["3"]
    one, two = adapter(tmp_path / "one", "step-3"), adapter(tmp_path / "two", "step-3")
    assert one.keys() == two.keys()
    for key in one:
        # Adam's third step from the restored moments: a lost optimizer state would move each weight by
        # about the learning rate (1e-2) instead (measured: 4e-8 apart).
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    before = adapter(fsdp_run, "step-2")
    assert any(not torch.equal(two[key], before[key]) for key in two)  # step 3 trained


def test_two_fsdp_processes_shard_a_4bit_base_and_train_what_one_process_trains(tmp_path):
    # bitsandbytes' packed 4-bit codes, stored in bf16 (quant_storage) so FSDP can flatten them with the
    # norms beside them, and sharded: each rank holds half of the weight bytes.
    int4 = [*DDP_FAST, "precision=int4"]
    result = run_cli(tmp_path / "two", *int4, *FSDP_TWO_RANKS)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process(tmp_path / "one", "precision=int4")
    one, two = adapter(tmp_path / "one", "final"), adapter(tmp_path / "two", "final")
    assert one.keys() == two.keys()
    for key in one:
        # The same 4-bit codes and statistics dequantised to the same bf16 weights (measured: identical).
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)  # it did train
    one_summary, two_summary = (
        json.loads((run / "run_summary.json").read_text())["precision_details"]
        for run in (tmp_path / "one", tmp_path / "two")
    )
    assert two_summary["quantized_layers"] == one_summary["quantized_layers"] == {"Linear4bit": 14}
    assert two_summary["weight_bytes"] < 0.51 * one_summary["weight_bytes"]  # rank 0's half (plus padding)


# ------------------------------------------------------------------------ the plugins' FSDP form, in-process
def test_a_plugin_fsdp_form_keeps_its_arguments_and_behaves_as_the_plugin():
    cfg = OmegaConf.create({"_target_": "vrft.precision.Bf16Precision", "load_dtype": "fp32"})
    sharded = instantiate(fsdp_precision_config(cfg))
    plain = Bf16Precision(load_dtype="fp32")
    assert isinstance(sharded, FSDPPrecision) and isinstance(sharded, Bf16Precision)
    assert (sharded.load_dtype, sharded.compute_dtype, sharded.adapter_dtype) == (
        plain.load_dtype,
        plain.compute_dtype,
        plain.adapter_dtype,
    )
    assert sharded.mixed_precision_config is None  # FSDP casts nothing: the plugin has cast every weight
    with sharded.module_init_context():  # FSDPPrecision's would switch the default dtype
        assert torch.get_default_dtype() == torch.float32
    batch = {"pixels": torch.ones(2, dtype=torch.float32)}
    assert sharded.convert_input(batch)["pixels"].dtype == torch.float32
    with sharded.forward_context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # vrft's autocast


@pytest.mark.parametrize(("precision", "reason"), [("fp16", "loss scaling"), ("int8", "int8 codes")])
def test_a_plugin_without_an_fsdp_form_is_named_with_the_reason(precision, reason):
    cfg = OmegaConf.load(Path(CONF) / "precision" / f"{precision}.yaml")
    with pytest.raises(ValueError, match=rf"trainer.strategy=fsdp with precision={precision}: .*{reason}"):
        fsdp_precision_config(cfg)


def test_a_forward_of_an_unsharded_policy_is_a_plain_call():
    module = torch.nn.Linear(2, 2)
    assert in_root_forward(module, lambda: 7) == 7
    assert "forward" not in module.__dict__
