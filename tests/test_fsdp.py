"""Lightning's FSDP strategy on CPU (gloo): two processes holding half of the tiny model each train the
adapter that one process trains, and so does one FSDP process (what a single GPU runs).

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

from tests.test_distributed import (
    REDUCED_METRICS,
    adapter,
    assert_same_adapter,
    assert_same_metrics,
    assert_trained,
    cli_run,
    metric_rows,
    one_process,
)
from tests.test_train_cli import CONF
from vrft.precision import Bf16Precision
from vrft.precision.fsdp import fsdp_precision_config
from vrft.runtime.sharding import in_root_forward

FSDP_TWO_RANKS = ["trainer.devices=2", "trainer.strategy=fsdp"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return cli_run(tmp_path_factory.mktemp("fsdp") / "two", *FSDP_TWO_RANKS)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One process, no strategy: the reference of the FSDP runs."""
    run_dir = tmp_path_factory.mktemp("plain") / "one"
    trainer, _, _ = one_process(run_dir)
    assert trainer.global_step == 2
    return run_dir


def test_two_fsdp_processes_train_the_adapter_one_process_trains(fsdp_run, plain_run):
    for name in ("step-1", "step-2", "final"):
        # The same sampled tokens (rollouts are seeded by their rows) and the same fp32 weights, gathered
        # before each use: only the order of fp32 additions differs (a gradient reduce-scattered from two
        # half-steps, a grad norm summed from two shards). Measured: step 1 bit-identical, 6e-10 after
        # step 2; the DDP test's bound holds with three orders of magnitude to spare.
        assert_same_adapter(adapter(fsdp_run, name), adapter(plain_run, name), f"{name}: ")
    assert_trained(adapter(fsdp_run, "final"))
    # The summary counts the model's parameters, not rank 0's shard of them.
    one_summary, two_summary = (
        json.loads((run / "run_summary.json").read_text()) for run in (plain_run, fsdp_run)
    )
    for key in ("trainable_parameters", "total_parameters"):
        assert two_summary[key] == one_summary[key], key
    # Rank 0 alone loaded the base (what one process holds); rank 1 built it on the meta device and received
    # rank 0's weights one unit at a time as they were sharded.
    assert two_summary["loaded_weight_bytes_by_rank"] == [one_summary["precision_details"]["weight_bytes"], 0]
    assert_same_metrics(fsdp_run, plain_run, (*REDUCED_METRICS, "train/grad_norm"))


def test_one_fsdp_process_trains_what_no_strategy_trains(plain_run, tmp_path):
    # One rank: FSDP keeps every unit whole (NO_SHARD), the path of a single GPU. The same weights as
    # views into flat tensors, the same kernels and tokens (measured: bit-identical); what could differ is
    # the order FSDP sums the gradient norm in, within the bound of the two-process comparison. Before
    # `reregister_unsharded_weights` this run failed at step 1's second micro-batch (the tied lm_head).
    # Through the CLI: in this process the run's process group and Lightning's MASTER_PORT would outlive it
    # and collide with the next multi-process run's.
    cli_run(tmp_path / "fsdp", "trainer.strategy=fsdp")
    for name in ("step-1", "step-2", "final"):
        assert_same_adapter(adapter(tmp_path / "fsdp", name), adapter(plain_run, name), f"{name}: ")
    assert_same_metrics(tmp_path / "fsdp", plain_run, (*REDUCED_METRICS, "train/grad_norm"))


def test_an_fsdp_checkpoint_resumes_on_one_process_and_on_two_fsdp_processes(fsdp_run, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "last.ckpt"
    # Written in the unsharded format: one process without a strategy resumes it as it would its own.
    trainer, _, _ = one_process(tmp_path / "one", f"ckpt_path={checkpoint}", "trainer.max_steps=3")
    assert trainer.global_step == 3
    cli_run(tmp_path / "two", *FSDP_TWO_RANKS, f"ckpt_path={checkpoint}", "trainer.max_steps=3")
    assert [r["step"] for r in metric_rows(tmp_path / "two")] == ["3"]
    one, two = adapter(tmp_path / "one", "step-3"), adapter(tmp_path / "two", "step-3")
    # Adam's third step from the restored moments: a lost optimizer state would move each weight by about
    # the learning rate (1e-2) instead (measured: 4e-8 apart).
    assert_same_adapter(two, one)
    before = adapter(fsdp_run, "step-2")
    assert any(not torch.equal(two[key], before[key]) for key in two)  # step 3 trained


def test_two_fsdp_processes_shard_a_4bit_base_and_train_what_one_process_trains(tmp_path):
    # bitsandbytes' packed 4-bit codes, stored in bf16 (quant_storage) so FSDP can flatten them with the
    # norms beside them, and sharded: each rank holds half of the weight bytes.
    cli_run(tmp_path / "two", "precision=int4", *FSDP_TWO_RANKS)
    one_process(tmp_path / "one", "precision=int4")
    one, two = adapter(tmp_path / "one", "final"), adapter(tmp_path / "two", "final")
    # The same 4-bit codes and statistics dequantised to the same bf16 weights (measured: identical).
    assert_same_adapter(two, one)
    assert_trained(two)
    one_summary, two_summary = (
        json.loads((run / "run_summary.json").read_text())["precision_details"]
        for run in (tmp_path / "one", tmp_path / "two")
    )
    assert two_summary["quantized_layers"] == one_summary["quantized_layers"] == {"Linear4bit": 14}
    assert two_summary["weight_bytes"] < 0.51 * one_summary["weight_bytes"]  # rank 0's half (plus padding)
    # Rank 1 received the packed codes and their statistics from rank 0 and quantised nothing itself.
    loaded = json.loads((tmp_path / "two" / "run_summary.json").read_text())["loaded_weight_bytes_by_rank"]
    assert loaded == [one_summary["weight_bytes"], 0]


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
