"""`python -m vrft.plan`, the hardware profiles, `auto` settings, and refusing a run that will not fit."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import vrft.models.policy
import vrft.modules.policy_module
import vrft.planner.planning
from tests.support import train_config as config
from vrft.planner.planning import precision_name, resolve_auto, verdict
from vrft.planner.report import PlanDoesNotFit
from vrft.train import fit

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["cpu", "rtx4090", "rtx4080-16g", "a100-80g", "h100-80g"]


def plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vrft.plan", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_plan_cli_prints_components_and_a_fitting_verdict():
    result = plan_cli("+hw=rtx4090", "model=qwen2vl-7b", "precision=int4")
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (
        "KV cache (rollout)",
        "update activations",
        "phase peaks",
        "verdict: FITS the 24.0 GiB budget",
    ):
        assert text in result.stdout


def test_plan_cli_names_the_change_that_makes_it_fit():
    result = plan_cli("+hw=rtx4090", "model=qwen2vl-7b", "precision=fp32")
    assert result.returncode == 1
    assert "DOES NOT FIT the 24.0 GiB budget" in result.stdout
    assert "suggestion: precision=bf16" in result.stdout


def test_plan_cli_names_a_badly_typed_setting():
    result = plan_cli("+hw=rtx4090", "model=qwen2vl-7b", "algorithm.group_size=16x")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "algorithm.group_size='16x' is not an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_qat_plans_like_its_mode():
    # The planner converts an adapter-less skeleton: QAT (which needs adapters) must not stop it.
    qat = verdict(config("+hw=rtx4090", "model=qwen2vl-2b", "precision=int4_qat"))
    plain = verdict(config("+hw=rtx4090", "model=qwen2vl-2b", "precision=int4"))
    assert qat.fits and qat.plan.components["weights"] == plain.plan.components["weights"]


@pytest.mark.parametrize("profile", PROFILES)
def test_hardware_profiles_compose_with_a_precision_on_the_command_line(profile):
    cfg = config(f"+hw={profile}", "precision=int4")
    assert cfg.hw.name == profile
    assert precision_name(cfg.precision) == "int4"


def test_command_line_wins_over_the_profile():
    cfg = config("+hw=rtx4090", "precision=int8", "algorithm.group_size=4", "memory_cap_gb=16")
    assert precision_name(cfg.precision) == "int8"
    assert cfg.algorithm.group_size == 4 and cfg.memory_cap_gb == 16
    default = config("+hw=rtx4090")
    assert precision_name(default.precision) == "int4"
    assert default.optimizer._target_.endswith("PagedAdamW8bit")
    assert default.memory_cap_gb == 24 and default.model.gradient_checkpointing


def test_precision_auto_picks_the_most_precise_mode_that_fits():
    roomy = resolve_auto(config("+hw=rtx4090", "model=qwen2vl-7b", "precision=auto"))
    assert precision_name(roomy.precision) == "bf16"
    tight = resolve_auto(config("+hw=rtx4090", "hw.memory_gb=14", "model=qwen2vl-7b", "precision=auto"))
    assert precision_name(tight.precision) == "int4"


def test_rollout_engine_auto_keeps_the_bf16_copy_only_where_it_fits():
    roomy = resolve_auto(config("+hw=rtx4090", "model=qwen2vl-7b"))
    assert roomy.algorithm.rollout_engine == "bf16_copy"
    small = resolve_auto(config("+hw=rtx4080-16g", "model=qwen2vl-7b"))
    assert small.algorithm.rollout_engine == "dequant"
    assert verdict(small).fits


@pytest.mark.parametrize("mma", [None, "VRFT_NF4_MMA=0"])
def test_rollout_engine_auto_puts_packed_first_where_nf4_mma_serves_it(monkeypatch, caplog, mma):
    # Where the 4-bit kernel can run (here pretended: this machine has no CUDA) `packed` goes first with
    # nf4_mma's kernel and after the bf16 copy without it (bench/rollout/results.md)
    monkeypatch.setattr(vrft.planner.planning, "packed_unavailable", lambda *args: None)
    monkeypatch.setattr(vrft.planner.planning, "mma_unavailable", lambda rows: mma)
    with caplog.at_level(logging.INFO, logger="vrft.planner.planning"):
        roomy = resolve_auto(config("+hw=rtx4090", "model=qwen2vl-7b"))
        small = resolve_auto(config("+hw=rtx4080-16g", "model=qwen2vl-7b"))
    picked = [r.getMessage() for r in caplog.records if "rollout_engine=auto picked" in r.getMessage()]
    assert small.algorithm.rollout_engine == "packed"  # the copy does not fit either way
    if mma is None:
        assert roomy.algorithm.rollout_engine == "packed"
        assert "decodes as fast as the bf16 copy without the copy" in picked[0]
    else:
        assert roomy.algorithm.rollout_engine == "bf16_copy"
        assert "packed is slower without nf4_mma's kernel: VRFT_NF4_MMA=0" in picked[0]
        assert "not bf16_copy: its copy needs" in picked[1]


def test_rollout_engine_auto_takes_the_bf16_copy_for_decode_batches_wider_than_nf4_mma_takes(
    monkeypatch, caplog
):
    # rollout_batch_size x G sequences decode together: 2 x 16 = 32 still go through nf4_mma's kernel,
    # 4 x 16 = 64 would go to nf4_matmul's, slower than the copy (kernel pretended available: no CUDA here)
    from vrft.kernels import nf4_matmul, nf4_mma

    monkeypatch.setattr(vrft.planner.planning, "packed_unavailable", lambda *args: None)
    monkeypatch.setattr(nf4_mma, "environment_unsupported", lambda: None)
    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", True)
    with caplog.at_level(logging.INFO, logger="vrft.planner.planning"):
        narrow = resolve_auto(config("+hw=rtx4090", "model=qwen2vl-2b", "algorithm.group_size=16"))
        wide = resolve_auto(
            config(
                "+hw=rtx4090", "model=qwen2vl-2b", "algorithm.group_size=16", "algorithm.rollout_batch_size=4"
            )
        )
    picked = [r.getMessage() for r in caplog.records if "rollout_engine=auto picked" in r.getMessage()]
    assert narrow.algorithm.rollout_engine == "packed"
    assert wide.algorithm.rollout_engine == "bf16_copy"
    assert "decode batches of 64 sequences (nf4_mma's kernel takes up to 32" in picked[1]


def test_training_refuses_before_loading_the_model(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the plan does not fit")

    for module in (vrft.models.policy, vrft.modules.policy_module):
        monkeypatch.setattr(module, "load_base_model", must_not_load)
    cfg = config("+hw=rtx4090", "model=qwen2vl-7b", "precision=fp32", f"run_dir={tmp_path}")
    with pytest.raises(
        PlanDoesNotFit, match="(?s)DOES NOT FIT.*suggestion: precision=bf16.*plan.enforce=false"
    ):
        fit(cfg)


def test_enforce_false_starts_anyway(tmp_path, monkeypatch):
    class Loaded(Exception):
        pass

    def stop_at_loading(*args, **kwargs):
        raise Loaded

    for module in (vrft.models.policy, vrft.modules.policy_module):  # its import may predate the patch
        monkeypatch.setattr(module, "load_base_model", stop_at_loading)
    cfg = config(
        "+hw=rtx4090", "model=qwen2vl-7b", "precision=fp32", "plan.enforce=false", f"run_dir={tmp_path}"
    )
    with pytest.raises(Loaded):
        fit(cfg)


def test_the_search_skips_changes_the_run_would_refuse_and_names_each_key_once():
    # rollout_batch_size=1 with 4 completions a prompt leaves 4 sequences, which an update micro-batch of 16
    # does not divide: a candidate GRPO would refuse. It used to end the search in that refusal's error, for a
    # run whose own settings are fine; the micro-batch, halved twice on the way, was named twice.
    cfg = config(
        "+hw=rtx4080-16g", "model=qwen2vl-7b", "precision=bf16", "algorithm.group_size=4",
        "algorithm.rollout_batch_size=4", "algorithm.update_micro_batch_size=16",
    )  # fmt: skip
    result = verdict(cfg)
    assert not result.fits and result.suggestion
    keys = [change.split("=", 1)[0] for change in result.suggestion]
    assert len(keys) == len(set(keys)), result.suggestion
    fixed = vrft.planner.planning._with(cfg, result.suggestion)
    assert verdict(fixed).fits, result.suggestion


def test_no_suggestion_where_no_change_is_enough():
    # a budget nothing fits: no list of changes that still does not fit, printed as if it did
    result = verdict(config("memory_cap_gb=0.05"))
    assert not result.fits and result.suggestion == []


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("hw.memory_gb=-5", "-5"),
        ("hw.memory_gb=0", "0"),
        ("hw.memory_gb=24GB", "'24GB'"),
        ("memory_cap_gb=0", "0"),
    ],
)
def test_a_budget_that_is_not_a_positive_number_is_named(override, shown):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"{key}={shown} is not a memory budget; pass GiB as a number > 0"):
        verdict(config("+hw=rtx4090", override))


def test_the_planned_adapter_is_the_one_the_run_starts_from(tmp_path):
    # a run from an adapter (the warm start, or lora.init_adapter) trains that adapter's rank and targets
    from peft import LoraConfig

    from vrft.planner.footprint import weight_footprint

    def adapter_params(*overrides):
        return weight_footprint(config(*overrides))[0].adapter_params

    warm = adapter_params("lora.r=4")  # the tiny model's warm start applies: its r=16, lm_head too
    assert warm == adapter_params(
        "warm_start=none", "lora.r=16", "lora.target_modules='(${lora_targets:})|lm_head'"
    )
    assert warm != adapter_params("warm_start=none", "lora.r=4")
    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    assert adapter_params(f"lora.init_adapter={tmp_path}") == adapter_params(
        "warm_start=none", "lora.r=8", r"lora.target_modules='.*\.(q_proj|v_proj)'"
    )
