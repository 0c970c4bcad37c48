"""What a person looks at: the terminal of a default run, loggers' config and samples, curves, sweep tables,
and the merged export. Two CLI runs are shared by every test here (a default run and a 2-job multirun)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.test_train_cli import CONF, FAST
from vrft.callbacks import StepProgressBar
from vrft.report import main as report_main
from vrft.visualize import answer_boxes, draw_sample

ROOT = Path(__file__).resolve().parents[1]
# The default run, short: FAST's GRPO settings with its bar on, and the warm start made in 3 steps.
DEFAULT_RUN = [o for o in FAST if o not in ("warm_start=none", "~callbacks.progress")] + [
    "warm_start.steps=3",
    "warm_start.callbacks.held_out_reward.max_rows=4",
]


def cli(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    command = [sys.executable, "-m", "vrft.train", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("dash") / "default"
    result = cli(f"hydra.run.dir={run_dir}", *DEFAULT_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout + result.stderr


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two jobs differing in the learning rate, logging to W&B (offline) and TensorBoard besides CSV."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "multirun"
    fast = [o for o in FAST if not o.startswith("optimizer.lr=")]  # the swept key
    # The FAST settings stay out of job folder names (which would pass the 255-character limit).
    fast_keys = ",".join(o.split("=")[0].lstrip("+~") for o in fast)
    result = cli(
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.job.config.override_dirname.exclude_keys=[{fast_keys},logger]",
        *fast,
        "logger=[wandb,tensorboard]",
        "optimizer.lr=1e-2,1e-3",
        env={"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(root / "wandb-data")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_default_run_prints_no_warning_and_one_step_bar(default_run):
    _, output = default_run
    assert "warning" not in output.lower(), output[-3000:]
    assert "Tip:" not in output  # Lightning's cloud advertisements
    assert "Epoch 0/-2" not in output and "train" in output


def test_step_bar_counts_optimizer_steps_to_max_steps_after_resume():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=3, global_step=2, max_epochs=-1, num_training_batches=4)
    assert bar.total_train_batches == 3  # optimizer steps, not the epoch's 4 batches
    assert bar._get_train_description(0) == "train"


def test_curves_samples_processor_and_slim_adapters(default_run):
    run_dir, _ = default_run
    curves = Image.open(run_dir / "curves.png")
    assert curves.size[0] > 400 and curves.size[1] > 300
    samples = sorted((run_dir / "samples").glob("step-00001-*.png"))
    assert len(samples) == 4  # algorithm.num_logged_samples
    assert (run_dir / "processor" / "tokenizer.json").is_file()
    for adapter in (run_dir / "adapter").iterdir():
        assert (adapter / "adapter_model.safetensors").is_file()
        assert not list(adapter.glob("tokenizer*")), f"tokenizer copy in {adapter}"


def test_boxes_are_drawn_where_the_answer_puts_them():
    image = Image.new("RGB", (100, 100), "white")
    truth = answer_boxes(
        "<answer>[{'Position': [100, 100, 500, 500], 'Confidence': 1}]</answer>", "detection", True
    )
    predicted = answer_boxes("<think>x</think><answer>(600,600),(900,900)</answer>", "grounding")
    assert truth == [(100, 100, 500, 500)] and predicted == [(600, 600, 900, 900)]
    figure = draw_sample(image, truth, predicted, "qwen2vl", ["caption"])
    scale = figure.width / 100  # 0..1000 grid on a 100 px image, scaled up to the figure's width
    assert figure.getpixel((int(10 * scale), int(30 * scale)))[1] > 150  # green left edge of the truth
    assert figure.getpixel((int(60 * scale), int(75 * scale)))[0] > 200  # red left edge of the prediction
    assert figure.height > figure.width  # the caption strip under the image


def test_tensorboard_has_config_hyperparameters_sample_images_and_final_metrics(sweep):
    job = sweep / "optimizer.lr=0.01"
    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["config/optimizer/lr"].number_value == pytest.approx(1e-2)
    assert hparams["config/lora/r"].number_value == 4
    assert hparams["precision/mode"].string_value == "fp32"
    assert "plan/device_gb" in hparams and "hardware/name" in hparams
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.01" in config_text
    tags = events.Tags()
    assert {"samples/0", "samples/3"} <= set(tags["images"])
    image = events.Images("samples/0")[0]
    assert image.step == 1 and image.width > 100
    assert "samples/0/text_summary" in tags["tensors"]
    assert "final/train/reward" in tags["scalars"]


def test_wandb_run_has_config_summary_and_sample_table_with_images(sweep):
    job = sweep / "optimizer.lr=0.01"
    (offline,) = (job / "wandb").glob("offline-run-*")
    # wandb 0.31 has no Python reader of its transaction log; its records hold the keys and JSON as text.
    log = next(offline.glob("*.wandb")).read_bytes()
    for fragment in (b'"device_gb":', b'"mode":"fp32"', b'"lr":0.01', b"final/train/reward"):
        assert fragment in log, fragment
    tables = list(offline.rglob("samples*.table.json"))  # incremental: one file per logged increment
    assert tables and all(json.loads(t.read_text())["columns"][:2] == ["step", "image"] for t in tables)
    # The table's images go to the run's artifact, staged under WANDB_DATA_DIR until `wandb sync`.
    staged = list((sweep.parent / "wandb-data").rglob("*"))
    assert any(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in staged), "no staged table image"


def test_sweep_summary_csv_and_report_compare_the_jobs(sweep, capsys):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "optimizer.lr=0.001",
        "optimizer.lr=0.01",
    ]
    with (sweep / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [r["job"] for r in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    for row in rows:
        assert row["overrides"].endswith(f"optimizer.lr={row['job'].split('=')[1]}")
        assert int(row["steps"]) == 2
        assert float(row["peak_memory_gb"]) > 0 and float(row["seconds_per_step"]) > 0
        assert row["train/reward"] != ""
    assert Image.open(sweep / "comparison.png").size[0] > 400

    (sweep / "comparison.png").unlink()
    report_main([str(sweep)])
    printed = capsys.readouterr().out
    assert "optimizer.lr=0.001" in printed and "seconds_per_step" in printed
    assert (sweep / "comparison.png").is_file()


def test_optuna_search_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=tiny_optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"warm_start.lora.r", "optimizer.lr", "loss.beta"}
    assert cfg.optimized_metric == "train/reward"


def test_export_merges_into_a_model_plain_transformers_loads(default_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from vrft.export import export
    from vrft.models.presets import tiny_checkpoint

    run_dir, _ = default_run
    adapter = run_dir / "adapter" / "final"
    merged = export(adapter, tmp_path / "merged", dtype="fp32")
    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 419, 30, 151645]])
    with torch.no_grad():
        # fp32 on both sides; the merged matmul sums in another order than base + B @ A, hence not equal.
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    AutoTokenizer.from_pretrained(merged)
    assert Qwen2VLImageProcessorPil.from_pretrained(merged).merge_size == 2


def test_job_folders_are_named_by_overrides_and_stay_short():
    from vrft.paths import MAX_JOB_FOLDER_CHARS, job_folder

    assert job_folder("optimizer.lr=0.001,seed=1", 3) == "optimizer.lr=0.001,seed=1"
    assert job_folder("", 2) == "job-2"
    long_a, long_b = "a=" + "x" * 300, "a=" + "x" * 299 + "y"
    assert len(job_folder(long_a, 0)) <= MAX_JOB_FOLDER_CHARS
    assert job_folder(long_a, 0) != job_folder(long_b, 0)  # the hash tells apart what the cut hides


def export_error(capsys, *arguments: str) -> str:
    """What `python -m vrft.export` prints when it refuses `arguments` (exit 2)."""
    from vrft.export import main as export_main

    with pytest.raises(SystemExit) as exit_info:
        export_main(list(arguments))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "config", ["{}", '{"base_model_name_or_path": null}', '{"base_model_name_or_path": "ti']
)
def test_export_names_an_adapter_config_without_a_readable_base(tmp_path, capsys, monkeypatch, config):
    # KeyError, TypeError and JSONDecodeError tracebacks before
    import vrft.export

    monkeypatch.setattr(vrft.export, "load_base_model", lambda *args: pytest.fail("the base loaded"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    error = export_error(capsys, str(adapter), str(tmp_path / "merged"))
    if config.endswith("}"):
        assert error == (
            f"vrft: error: adapter '{adapter}' records no base model (base_model_name_or_path); "
            "pass --base <model folder>\n"
        )
    else:
        assert error.startswith(f"vrft: error: '{adapter / 'adapter_config.json'}' is not valid JSON (")
        assert error.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_export_names_a_missing_base_by_the_option_or_file_that_set_it(tmp_path, capsys, monkeypatch):
    # --base used to be named `model.name_or_path`, a key export does not have
    import vrft.export

    monkeypatch.setattr(vrft.export, "load_base_model", lambda *args: pytest.fail("the base loaded"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/model"}))
    fix = "pass --base <a local Qwen2-VL / Qwen2.5-VL checkpoint folder>"
    assert export_error(capsys, str(adapter), str(tmp_path / "a"), "--base", "/nonexistent/model") == (
        f"vrft: error: --base '/nonexistent/model' does not exist; {fix}\n"
    )
    assert export_error(capsys, str(adapter), str(tmp_path / "b")) == (
        f"vrft: error: adapter '{adapter}' records base model '/gone/model', which does not exist; {fix}\n"
    )


def test_export_of_a_lora_full_runs_weights_says_they_load_as_they_are(tmp_path, capsys):
    # `lora=full` writes the model itself to adapter/final: "has no adapter_config.json; pass a peft adapter
    # folder such as <run>/adapter/final" named the folder the user had passed
    final = tmp_path / "run" / "adapter" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"")
    error = export_error(capsys, str(final), str(tmp_path / "merged"))
    assert error.startswith(
        f"vrft: error: '{final}' holds a whole model (config.json; a lora=full run's weights)"
    )
    assert f"AutoModelForImageTextToText.from_pretrained('{final}')" in error
    assert f"from '{tmp_path / 'run' / 'processor'}'" in error and error.count("\n") == 1


def test_report_leaves_out_what_a_run_stopped_mid_write_cut(tmp_path, capsys):
    # a cut last row (ValueError) and a cut held_out.json (JSONDecodeError) stopped the whole report
    (tmp_path / "logs").mkdir()
    metrics = tmp_path / "logs" / "metrics.csv"
    metrics.write_text("step,train/reward,train/loss\n0,1.0,2.5\n1,1.5,2.25\n2,3.1e")
    (tmp_path / "held_out.json").write_text('{"before": {"reward/total": 0.5}, "aft')
    report_main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "  steps             2\n  train/reward      1.5\n  train/loss        2.25\n" in out
    assert (tmp_path / "curves.png").is_file()
    assert err.splitlines()[0] == (
        f"vrft: warning: '{metrics}': skipped 1 unreadable value(s) (a run stopped mid-write cuts its last row)"
    )
    assert err.splitlines()[1].startswith(
        f"vrft: warning: '{tmp_path / 'held_out.json'}' is not valid JSON ("
    )
    assert len(err.splitlines()) == 2


def test_report_names_a_folder_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"vrft: error: '{tmp_path / 'nope'}' does not exist; pass a run folder or a folder of runs\n"
    )
