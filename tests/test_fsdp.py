"""Lightning's FSDP strategy on CPU (gloo): two processes holding half of the tiny model each train the
adapter that one process trains.

Built as `tests/test_distributed.py` is: the two-process run goes through the real CLI (Lightning's launcher
starts rank 1), the one-process reference runs in this process with the same global batch and seed.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import DDP_FAST, metric_rows, one_process
from tests.test_train_cli import run_cli
from vrft.models.presets import tiny_checkpoint

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
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)  # it did train
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
