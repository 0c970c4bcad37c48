"""The `small` preset and the precision comparison on it (bench/learning, issue 18), checked on CPU without
building its 105M parameters: the architecture from its config on the meta device, the matrix from its
definition, the experiments through Hydra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.support import bench_module
from vrft.models.policy import ModelSpec
from vrft.models.presets import CHECKPOINT_PRESETS, model_class, preset_config

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    return bench_module(f"bench/learning/{name}.py")


def _matrix():
    return _bench("run_matrix")


def test_small_is_a_qwen2vl_of_tens_of_millions_of_parameters_with_the_real_vocabulary():
    config = preset_config("small")
    with torch.device("meta"):
        model = model_class(config)._from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert config.text_config.vocab_size == 151936 and embedding == 151936 * 512  # tied to lm_head
    assert total - embedding == 27_594_240  # the count its preset comment states (27.6M)
    assert "small" in CHECKPOINT_PRESETS and not ModelSpec(name_or_path="small").is_random_preset


def test_small_parity_matrix_is_three_tasks_five_precisions_three_seeds():
    module = _matrix()
    axes, fixed = module.MATRICES["small-parity"]
    cells = module.cells(axes, fixed)
    assert len(cells) == 60  # detection twice: plain generate and the static engine
    names = {module.cell_name(cell, fixed) for cell in cells}
    assert len(names) == 60  # every cell has its own run folder
    assert "small_parity_grounding_int4_qat_seed-3" in names
    assert {"small_parity_detection_int8_seed-1", "small_parity_detection_bf16_copy_int8_seed-1"} <= names


@pytest.mark.parametrize("task", ["classification", "detection", "grounding"])
def test_small_experiments_train_the_small_model_from_its_warm_start(task):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment=small_parity_{task}", "precision=int4_qat"])
    assert cfg.model.name_or_path == "small" and cfg.task.name == task
    assert list(cfg.warm_start.models) == ["small"]  # the warm start applies to this model
    assert cfg.warm_start.callbacks.held_out_reward.measure_merged  # the export gap is measured
    assert cfg.precision.qat


def _run(precision: str, engine: str, seed: int, after: float, merged: float | None = None) -> dict:
    held_out = {
        "before": {"reward/total": 0.5, "reward/iou": 0.04, "greedy/map_50": 0.0},
        "after": {"reward/total": after, "reward/iou": after / 5, "greedy/map_50": 0.0},
    }
    if merged is not None:
        held_out["merged"] = {"reward/total": merged, "reward/iou": merged / 5, "greedy/map_50": 0.0}
    return {"task": "detection", "precision": precision, "engine": engine, "seed": seed, "held_out": held_out}


def test_report_compares_each_precision_with_bf16_of_its_own_engine():
    report = _bench("report")
    runs = [
        *(_run("bf16", "hf", seed, 1.3) for seed in (1, 2)),
        *(_run("int4", "hf", seed, 1.2) for seed in (1, 2)),
        *(_run("bf16", "bf16_copy", seed, value) for seed, value in ((1, 1.0), (2, 1.2))),
        _run("int8", "bf16_copy", 1, 1.0, merged=0.9),
        _run("int8", "bf16_copy", 2, 1.0),  # stopped before its merged measurement
    ]
    groups = report.summarise(runs)["detection"]
    assert list(groups) == ["bf16", "int4", "bf16 [bf16_copy]", "int8 [bf16_copy]"]
    assert groups["int4"]["vs_bf16_reference"] == "bf16"
    int8 = groups["int8 [bf16_copy]"]
    assert int8["vs_bf16_reference"] == "bf16 [bf16_copy]"
    assert int8["vs_bf16_total"] == pytest.approx(1.0 - 1.1)
    # s.e. of a difference of means: sqrt(0 / 2 + 0.1414^2 / 2) with the bf16 spread s.d.(1.0, 1.2).
    assert int8["vs_bf16_se"] == pytest.approx(0.1)
    assert int8["export_gap_total"] == pytest.approx([-0.1, 0.0]) and int8["export_gap_runs"] == 1
    assert "(over 1 of 2 seeds)" in report.table({"detection": groups})


def test_report_skips_a_run_stopped_before_its_held_out_result_after_grpo(tmp_path):
    report = _bench("report")
    (tmp_path / "held_out.json").write_text('{"before": {"reward/total": 0.5}}')
    assert report.load_run(tmp_path) is None
