"""Lightning's DDP strategy on CPU (gloo): two processes train the tiny model as one process does.

The two-process run goes through the real CLI; Lightning's launcher re-runs `python -m vrft.train` for rank 1
with Hydra's run folder (Lightning's documented Hydra support), so nothing here starts processes by hand.
The one-process references run in this process (`fit`), which saves a second interpreter start.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from tests.test_train_cli import CONF, FAST, run_cli
from vrft.distributed import check_distributed
from vrft.models.presets import tiny_checkpoint
from vrft.train import fit

# One rollout batch = one prompt, so generation never pads one prompt against another (padding would make a
# prompt's logits depend on its batch-mates, which differ between 1 and 2 ranks); 4 prompts per step: 2 per
# rank. Rollouts are seeded by their rows (algorithm.rollout_seed), so each prompt samples the same tokens
# whichever rank generates it.
DDP_FAST = ["algorithm.rollout_batch_size=1", "algorithm.prompts_per_step=4", "trainer.accelerator=cpu"]
TWO_RANKS = ["trainer.devices=2", "trainer.strategy=ddp"]


def metric_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logs" / "metrics.csv").open() as file:
        return [row for row in csv.DictReader(file) if row.get("train/reward")]


def one_process(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *DDP_FAST, *overrides])
    cfg.run_dir = str(run_dir)
    return fit(cfg)


def cli_run(run_dir: Path, *overrides: str) -> Path:
    """A run of the real CLI with `DDP_FAST` (Lightning's launcher starts the other ranks); it must succeed."""
    # Built once here: two ranks building the tiny checkpoint into a cold cache at the same moment can race.
    tiny_checkpoint()
    result = run_cli(run_dir, *DDP_FAST, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def adapter(run_dir: Path, name: str) -> dict:
    return load_file(run_dir / "adapter" / name / "adapter_model.safetensors")


def assert_same_adapter(ours: dict, reference: dict, label: str = "") -> None:
    """The same adapter keys, each weight within rtol 1e-5 / atol 1e-6 (each caller says why that holds)."""
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{label}{key}")


def assert_trained(weights: dict) -> None:
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # LoRA B starts at zero


def assert_same_metrics(run_dir: Path, reference_dir: Path, keys: tuple[str, ...]) -> None:
    """Steps 1 and 2 logged, with `keys` equal to the reference run's up to the order of summation."""
    rows, reference = metric_rows(run_dir), metric_rows(reference_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == ["1", "2"]
    for key in keys:
        for row, reference_row in zip(rows, reference, strict=True):
            # Rewards and counts are sums of the same values, summed in another order across ranks.
            assert float(row[key]) == pytest.approx(float(reference_row[key]), rel=1e-5, abs=1e-7), key


REDUCED_METRICS = ("train/reward", "train/loss", "train/completion_length", "train/kl", "train/lr")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    return cli_run(tmp_path_factory.mktemp("ddp") / "two", *TWO_RANKS)


def test_two_processes_train_the_adapter_one_process_trains(two_process_run, tmp_path):
    trainer, _, _ = one_process(tmp_path / "one")
    assert trainer.global_step == 2
    for name in ("step-1", "step-2", "final"):
        # Same prompts per step, same sampled tokens: only the order of fp32 additions differs (DDP sums
        # two half-step gradients, one process accumulates four micro-batches), ~1e-7 relative per sum;
        # two Adam steps of lr 1e-3 keep the adapters within 1e-6 (measured: 1.5e-9).
        assert_same_adapter(adapter(two_process_run, name), adapter(tmp_path / "one", name), f"{name}: ")
    assert_trained(adapter(two_process_run, "final"))
    # The logged step count and the metrics reduced over ranks are the one-process figures.
    assert_same_metrics(two_process_run, tmp_path / "one", REDUCED_METRICS)


def test_rank_zero_alone_writes_the_run_files(two_process_run):
    # The dashboards' outputs (curves, the processor saved once per run, sample images) are rank 0's too.
    names = {path.name for path in two_process_run.iterdir()} - {"curves.png", "processor", "samples"}
    # Hydra's per-process log of rank 1 is the only file of its own; everything else exists once.
    assert names == {
        ".hydra",
        "adapter",
        "checkpoints",
        "config.yaml",
        "logs",
        "run_summary.json",
        "samples.jsonl",
        "train.log",
        "train_ddp_process_1.log",
    }
    assert sorted(p.name for p in (two_process_run / "adapter").iterdir()) == ["final", "step-1", "step-2"]
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-step=1.ckpt",
        "step-step=2.ckpt",
    ]
    summary = json.loads((two_process_run / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    # Rank 0's samples only: 2 steps x its last rollout of 1 prompt x G = 2 completions, appended once.
    steps = [
        json.loads(line)["step"] for line in (two_process_run / "samples.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) * 2


def test_two_process_checkpoint_resumes_on_one(two_process_run, tmp_path):
    checkpoint = two_process_run / "checkpoints" / "last.ckpt"
    trainer, _, _ = one_process(tmp_path / "resumed", f"ckpt_path={checkpoint}", "trainer.max_steps=3")
    assert trainer.global_step == 3
    assert [r["step"] for r in metric_rows(tmp_path / "resumed")] == ["3"]
    optimizer = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert float(next(iter(optimizer["optimizer_states"][0]["state"].values()))["step"]) == 3


@pytest.mark.gpu
def test_one_gpu_under_ddp_trains_what_no_strategy_trains(tmp_path):
    # One rank of DDP on a GPU (NCCL, in this process): the all-reduce over one rank is a copy, so the adapter
    # must be the one a run without a strategy trains. Same process, device, kernels and sampled tokens;
    # the 1e-6 of the CPU comparison above covers any reordering the DDP wrapper might bring.
    gpu = ["algorithm.rollout_batch_size=1", "algorithm.prompts_per_step=4", "trainer.accelerator=gpu"]
    one_process(tmp_path / "plain", *gpu, "trainer.devices=1")
    one_process(tmp_path / "ddp", *gpu, "trainer.devices=1", "trainer.strategy=ddp")
    plain = load_file(tmp_path / "plain" / "adapter" / "final" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter" / "final" / "adapter_model.safetensors")
    assert plain.keys() == ddp.keys()
    for key in plain:
        torch.testing.assert_close(ddp[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in ddp.items() if "lora_B" in k)  # it did train


def sampled_completions(run_dir: Path) -> list[tuple[int, str]]:
    rows = (json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines())
    return [(row["step"], row["completion"]) for row in rows]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_one_gpu_under_fsdp_trains_what_no_strategy_trains(precision, tmp_path):
    # One FSDP rank on a GPU (NCCL, in this process). With one rank FSDP keeps every weight whole (NO_SHARD),
    # its reduce over one rank is a copy, and int4 codes are quantised on this GPU as the plain run's are.
    # What remains different is where the weights sit: views into one flat tensor per unit, each aligned to
    # 16 bytes only, and cuBLAS picks its kernel by the alignment of its operands (up to 256 bytes); a weight
    # at another alignment than its plain twin could be multiplied by another kernel and round differently
    # in bf16. Every weight and bias of the small preset is a multiple of 256 bytes (tiny's 64-wide biases
    # are not), so each view sits where a weight of its own would, and both runs multiply with one kernel.
    gpu = [
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        f"precision={precision}",
        "model.name_or_path=small",
    ]
    one_process(tmp_path / "plain", *gpu)
    one_process(tmp_path / "fsdp", *gpu, "trainer.strategy=fsdp")
    # Like with like: rollouts are seeded by their rows, so the same logits sample the same tokens.
    assert sampled_completions(tmp_path / "fsdp") == sampled_completions(tmp_path / "plain")
    for name in ("step-1", "step-2", "final"):
        # The same kernels on the same tokens; what differs is FSDP's gradient norm, which sums the per-matrix
        # norms in another order: a last-bit change of the clipping factor when clipping acts, which Adam's
        # normalised step shrinks further. The CPU comparisons' 1e-5 / 1e-6 cover it.
        assert_same_adapter(adapter(tmp_path / "fsdp", name), adapter(tmp_path / "plain", name), f"{name}: ")
    assert_trained(adapter(tmp_path / "fsdp", "final"))
    assert_same_metrics(tmp_path / "fsdp", tmp_path / "plain", (*REDUCED_METRICS, "train/grad_norm"))


# ------------------------------------------------------------------------- settings refused before loading
def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["warm_start=none", *overrides])


def test_more_devices_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ValueError, match=r"trainer.devices=2 asks for 2 GPUs but 1 are visible.*trainer.devices=1"
    ):
        check_distributed(_cfg("trainer.accelerator=gpu", "trainer.devices=2", "trainer.strategy=ddp"))


@pytest.mark.parametrize(("strategy", "precision"), [("fsdp", "int8"), ("deepspeed_stage_2", "int4")])
def test_sharding_strategy_with_a_quantised_base_is_refused(strategy, precision):
    cfg = _cfg(f"precision={precision}", "trainer.accelerator=cpu", f"trainer.strategy={strategy}")
    with pytest.raises(
        ValueError, match=rf"trainer.strategy={strategy} with precision={precision}.*not supported"
    ):
        check_distributed(cfg)
    check_distributed(_cfg("precision=int4", "trainer.accelerator=cpu", "trainer.strategy=ddp"))  # fine


def test_fsdp_takes_the_floating_precisions_and_the_hf_engine_only():
    for precision in ("fp32", "bf16", "int4", "auto"):  # auto: checked again once the planner picked it
        check_distributed(_cfg(f"precision={precision}", "trainer.accelerator=cpu", "trainer.strategy=fsdp"))
    with pytest.raises(ValueError, match=r"trainer.strategy=fsdp with precision=fp16: .*precision=bf16"):
        check_distributed(_cfg("precision=fp16", "trainer.accelerator=cpu", "trainer.strategy=fsdp"))
    with pytest.raises(
        ValueError, match=r"algorithm.rollout_engine=bf16_copy cannot run under trainer.strategy=fsdp.*=hf"
    ):
        check_distributed(
            _cfg("trainer.accelerator=cpu", "trainer.strategy=fsdp", "algorithm.rollout_engine=bf16_copy")
        )
    with pytest.raises(ValueError, match=r"trainer.strategy=deepspeed_stage_2 is not one vrft runs"):
        check_distributed(
            _cfg("precision=bf16", "trainer.accelerator=cpu", "trainer.strategy=deepspeed_stage_2")
        )


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_an_8bit_optimizer_under_fsdp_is_refused_before_loading(optimizer):
    # Its blockwise statistics are not shaped like the parameters: FSDP's optimizer-state gather fails on
    # them at the first checkpoint (measured), so the run stops before the model loads, naming the fix.
    fsdp = ["trainer.accelerator=cpu", f"optimizer={optimizer}"]
    with pytest.raises(
        ValueError,
        match=r"trainer.strategy=fsdp with optimizer._target_=bitsandbytes\.optim\..*8bit: .*absmax.*optimizer=adamw",
    ):
        check_distributed(_cfg(*fsdp, "trainer.strategy=fsdp"))
    check_distributed(_cfg(*fsdp, "trainer.strategy=ddp"))  # DDP keeps each rank's state whole: fine
    check_distributed(_cfg("trainer.accelerator=cpu", "optimizer=adamw", "trainer.strategy=fsdp"))


def test_prompts_that_do_not_split_over_the_ranks_stop_the_cli_before_loading(tmp_path):
    result = run_cli(tmp_path / "bad", *DDP_FAST, *TWO_RANKS, "algorithm.prompts_per_step=3")
    assert result.returncode == 2
    assert "vrft: error: algorithm.prompts_per_step=3 does not split over 2 ranks" in result.stderr
    assert "algorithm.prompts_per_step=2" in result.stderr  # the fix, spelled out
    assert "Traceback" not in result.stderr and not (tmp_path / "bad" / "config.yaml").exists()
