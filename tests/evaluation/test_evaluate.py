"""`vrft.evaluate` on Visual-RFT-schema data: metrics, predictions.jsonl, resume, before/after, bad input.

Decoding is a stub (`StubDecoder`) so that each metric sees known answers; everything around it (the tiny
model and adapters loading through Lightning, the rows, the records, the table) is the real code. The real
decoder runs end to end in `test_readme.py`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra.utils import instantiate
from peft import get_peft_model
from transformers import AutoModelForImageTextToText

import vrft.evaluate
from tests.evaluation.support import (
    CAT,
    NONE,
    Interrupted,
    StubDecoder,
    eval_config,
    image,
    install,
    local_model,
    random_adapter,
    read_predictions,
    schema_rows,
    write_dataset,
)
from tests.support import train_config
from vrft.evaluate import evaluate
from vrft.evaluation.adapters import check_adapter
from vrft.evaluation.records import PredictionLog
from vrft.kernels import nf4_matmul, nf4_mma
from vrft.models.presets import tiny_checkpoint
from vrft.resume import CHECKPOINT_KEY, resume_settings


def perfect(row, adapted):
    return row["solution"]


def run(tmp_path, task, layout="disk", rows=None, *overrides):
    data = write_dataset(rows or schema_rows(task), tmp_path / f"data-{layout}", layout)
    cfg = eval_config(tmp_path / "out", f"task={task}", "data=disk", f"data.path={data}", *overrides)
    return evaluate(cfg), cfg


@pytest.mark.parametrize("layout", ["disk", "parquet"])
@pytest.mark.parametrize("task", ["detection", "classification", "grounding"])
def test_visual_rft_schema_rows_evaluate_as_they_are(tmp_path, monkeypatch, task, layout):
    decoder = install(monkeypatch, StubDecoder(perfect))
    results, _ = run(tmp_path, task, layout)
    metric = {"detection": "map", "classification": "accuracy", "grounding": "miou"}[task]
    assert results["base"][metric] == pytest.approx(1.0)
    assert sorted(decoder.rows) == list(range(len(schema_rows(task))))
    records = read_predictions(tmp_path / "out")
    assert all(r["reward"] > 0 and r["answer"] is not None for r in records)
    if task == "detection":
        # Category from the prompt; the two rows of one image share one content-hash id.
        assert [r["category"] for r in records] == ["cat", "dog", "cat", "dog"]
        assert records[0]["image_id"] == records[1]["image_id"] != records[2]["image_id"]
        assert results["base"]["map/cat"] == pytest.approx(1.0)
    if task == "grounding":
        assert results["base"]["giou"] == pytest.approx(1.0)


def test_boxes_answered_for_absent_categories_cost_map(tmp_path, monkeypatch):
    def boxes_everywhere(row, adapted):
        # The true boxes at confidence 0.5, and a confident box where the truth is "No Objects".
        return row["solution"].replace("1}", "0.5}") if row["solution"] != NONE else CAT.replace("1}", "0.9}")

    install(monkeypatch, StubDecoder(boxes_everywhere))
    red_cat, _, blue_cat, _ = schema_rows("detection")
    green_no_cat = {**red_cat, "image": image((30, 200, 30)), "solution": NONE}
    present_only, _ = run(tmp_path / "present", "detection", "disk", [red_cat, blue_cat])
    with_absent, _ = run(tmp_path / "absent", "detection", "disk", [red_cat, blue_cat, green_no_cat])
    assert present_only["base"]["map"] == pytest.approx(1.0)
    # Ranked: FP (0.9), TP, TP (0.5): precision 1/2 at recall 1/2, 2/3 at recall 1; the interpolated
    # precision is 2/3 at every recall point and IoU threshold (exact boxes): AP = 2/3.
    assert with_absent["base"]["map"] == pytest.approx(2 / 3)


def test_hand_computed_map_through_the_cli_matches_pycocotools(tmp_path, monkeypatch):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # Image A has one cat; image B none. The model finds A's cat at 0.6 and "sees" one in B at 0.9.
    rows = [schema_rows("detection")[0], {**schema_rows("detection")[2], "solution": NONE}]
    answers = {0: CAT.replace("1}", "0.6}"), 1: CAT.replace("1}", "0.9}")}
    install(monkeypatch, StubDecoder(lambda row, adapted: answers[row["row_index"]]))
    data = write_dataset(rows, tmp_path / "data", "parquet")
    out = tmp_path / "out"
    argv = [
        "vrft.evaluate",
        "task=detection",
        "data=disk",
        f"data.path={data}",
        f"hydra.run.dir={out}",
        "max_new_tokens=4",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    vrft.evaluate.main()
    cli = json.loads((out / "metrics.json").read_text())["results"]["base"]
    # By hand: ranked FP (0.9) then TP (0.6): precision 1/2 at recall 1, so interpolated precision is 1/2 at
    # every recall point and every IoU threshold (the box is exact): mAP = mAP@.50 = 0.5.
    assert cli["map"] == pytest.approx(0.5) and cli["map_50"] == pytest.approx(0.5)

    # The same case given to pycocotools directly, in pixels (56 x 56 images, 0..1000 grid).
    box = [0.1 * 56, 0.1 * 56, 0.4 * 56, 0.4 * 56]  # xywh of grid [100, 100, 500, 500]
    truth = COCO()
    truth.dataset = {
        "images": [{"id": 1, "width": 56, "height": 56}, {"id": 2, "width": 56, "height": 56}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        ],
    }
    truth.createIndex()
    found = truth.loadRes(
        [
            {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.6},
            {"image_id": 2, "category_id": 1, "bbox": box, "score": 0.9},
        ]
    )
    direct = COCOeval(truth, found, iouType="bbox")
    direct.evaluate(), direct.accumulate(), direct.summarize()
    assert cli["map"] == pytest.approx(direct.stats[0]) and cli["map_50"] == pytest.approx(direct.stats[1])


def test_interrupted_evaluation_resumes_without_decoding_finished_rows(tmp_path, monkeypatch):
    data = write_dataset(schema_rows("detection") * 2, tmp_path / "data", "disk")
    overrides = ["task=detection", "data=disk", f"data.path={data}", "batch_size=2"]
    install(monkeypatch, StubDecoder(perfect, fail_after=2))
    with pytest.raises(Interrupted):
        evaluate(eval_config(tmp_path / "out", *overrides))
    assert len(read_predictions(tmp_path / "out")) == 4  # two batches written before the interruption
    with (tmp_path / "out" / "predictions.jsonl").open("a") as file:
        file.write('{"model": "base", "row_ind')  # a line cut off mid-write

    decoder = install(monkeypatch, StubDecoder(perfect))
    results = evaluate(eval_config(tmp_path / "elsewhere", *overrides, f"resume={tmp_path / 'out'}"))
    assert sorted(decoder.rows) == [4, 5, 6, 7]  # only the rows not yet decoded
    assert sorted(r["row_index"] for r in read_predictions(tmp_path / "out")) == list(range(8))
    assert results["base"]["map"] == pytest.approx(1.0)


def test_a_failing_metric_leaves_every_prediction_on_disk(tmp_path, monkeypatch):
    install(monkeypatch, StubDecoder(perfect))
    monkeypatch.setattr("vrft.evaluation.evaluators.detection_map", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(tmp_path, "detection")
    assert len(read_predictions(tmp_path / "out")) == 4


def test_adapters_share_one_table_with_differences_to_the_base(tmp_path, monkeypatch, capsys):
    adapter = random_adapter(tmp_path / "adapter")
    install(
        monkeypatch, StubDecoder(lambda row, adapted: row["solution"] if adapted else "<answer>x</answer>")
    )
    results, _ = run(tmp_path, "classification", "disk", None, f"adapters=[{adapter}]")
    assert results == {
        "base": {"accuracy": 0.0, "accuracy/rose": 0.0, "accuracy/tulip": 0.0},
        str(adapter): {"accuracy": 1.0, "accuracy/rose": 1.0, "accuracy/tulip": 1.0},
    }
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| metric (%) | base | {adapter} | Δ vs base |" in table
    assert "| accuracy | 0.0 | 100.0 | +100.0 |" in table
    assert table in capsys.readouterr().out


def test_missing_split_names_the_splits_and_split_key(tmp_path, monkeypatch):
    decoder = install(monkeypatch, StubDecoder(perfect))
    data = write_dataset(schema_rows("classification"), tmp_path / "data", "disk", split="train")
    with pytest.raises(
        ValueError, match=r"no split 'test' \(splits: \['train'\]\); choose one with split=train"
    ):
        evaluate(eval_config(tmp_path / "out", "task=classification", "data=disk", f"data.path={data}"))
    assert decoder.rows == []


def test_bad_rows_are_listed_by_number_before_decoding_or_skipped(tmp_path, monkeypatch):
    decoder = install(monkeypatch, StubDecoder(perfect))
    rows = schema_rows("detection")
    rows[1]["solution"] = "<answer>[{'Position': [1, 2</answer>"  # unparseable
    rows[2]["problem"] = "Find every object."  # names no category
    with pytest.raises(
        ValueError, match=r"2 bad row\(s\) in split 'test' \(rows 1, 2\); row 1: .*on_bad_row=skip"
    ):
        run(tmp_path, "detection", rows=rows)
    assert decoder.rows == []
    results, _ = run(tmp_path / "skip", "detection", "disk", rows, "on_bad_row=skip")
    assert sorted(decoder.rows) == [0, 3]
    assert json.loads((tmp_path / "skip" / "out" / "metrics.json").read_text())["skipped_rows"] == [1, 2]


def test_categories_no_row_asks_about_are_named_before_decoding(tmp_path, monkeypatch):
    # a misspelt category had no AP: left out of the average, or the average NaN, after the whole split decoded
    decoder = install(monkeypatch, StubDecoder(perfect))
    with pytest.raises(
        ValueError,
        match=r"categories names \['bus'\], which no row of split 'test' asks about \(rows ask about",
    ):
        run(tmp_path, "detection", "disk", None, "task.evaluator.categories=[cat,bus]")
    assert decoder.rows == []
    results, _ = run(tmp_path / "one", "detection", "disk", None, "task.evaluator.categories=cat")
    assert results["base"]["map"] == pytest.approx(1.0) and "map/cat" in results["base"]


def test_a_row_whose_image_cannot_be_decoded_is_named_before_decoding_or_skipped(tmp_path, monkeypatch):
    # It used to stop the run in the batch that met it, after the rows before; on_bad_row=skip did not skip it.
    decoder = install(monkeypatch, StubDecoder(perfect))
    rows = schema_rows("detection")
    rows[2]["image"] = {"bytes": b"not an image", "path": "broken.jpg"}
    with pytest.raises(
        ValueError, match=r"1 bad row\(s\) in split 'test' \(rows 2\); row 2: image 'broken.jpg' could not be"
    ):
        run(tmp_path, "detection", rows=rows)
    assert decoder.rows == []
    results, _ = run(tmp_path / "skip", "detection", "disk", rows, "on_bad_row=skip")
    assert sorted(decoder.rows) == [0, 1, 3]
    assert json.loads((tmp_path / "skip" / "out" / "metrics.json").read_text())["skipped_rows"] == [2]


def test_adapter_of_another_model_is_refused_before_loading(tmp_path, monkeypatch):
    decoder = install(monkeypatch, StubDecoder(perfect))
    adapter = random_adapter(tmp_path / "adapter")
    data = write_dataset(schema_rows("classification"), tmp_path / "data", "disk")
    cfg = eval_config(
        tmp_path / "out", "model=qwen2vl-2b", "data=disk", f"data.path={data}", f"adapters=[{adapter}]"
    )
    with pytest.raises(
        ValueError,
        match=rf"adapter '{adapter}' \(trained on '.*'\) does not fit model.name_or_path='qwen2vl-2b'",
    ):
        evaluate(cfg)
    assert decoder.rows == []
    local = local_model(tmp_path / "local")
    check_adapter(
        adapter, instantiate(eval_config(tmp_path, "model=local", f"model.name_or_path={local}").model)
    )


@pytest.mark.parametrize("cut", ["adapter_config.json", "adapter_model.safetensors"])
def test_an_adapter_copied_in_part_is_named_before_loading(tmp_path, cut):
    # a cut-short config read "Expecting ',' delimiter" without a file name; cut-short weights a SafetensorError trace
    adapter = random_adapter(tmp_path / "adapter")
    whole = (adapter / cut).read_bytes()
    (adapter / cut).write_bytes(whole[: len(whole) // 2])
    spec = instantiate(eval_config(tmp_path, "model=tiny").model)
    with pytest.raises(ValueError, match=rf"'{adapter / cut}' .*copied or written in part"):
        check_adapter(adapter, spec)


def test_one_adapter_without_brackets_is_one_adapter(tmp_path, monkeypatch):
    adapter = random_adapter(tmp_path / "adapter")
    install(monkeypatch, StubDecoder(perfect))
    results, _ = run(tmp_path, "classification", "disk", None, f"adapters={adapter}")
    assert list(results) == ["base", str(adapter)]


@pytest.mark.parametrize(
    ("first", "again", "label"),
    [("{a}", "{a}/", "{a}"), ("adapter/", "{a}", "adapter"), ("{a}", "./adapter", "{a}")],
    ids=["trailing slash", "absolute for relative", "relative for absolute"],
)
def test_a_resume_knows_an_adapter_by_its_folder_however_it_is_spelt(
    tmp_path, monkeypatch, first, again, label
):
    # `adapters=<folder>/` on resume was another label than `adapters=<folder>`: its rows were decoded again
    # and it showed as a second adapter in the table
    adapter = random_adapter(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    data = write_dataset(schema_rows("classification"), tmp_path / "data", "disk")
    overrides = ["task=classification", "data=disk", f"data.path={data}"]
    install(monkeypatch, StubDecoder(perfect))
    evaluate(eval_config(tmp_path / "out", *overrides, f"adapters={first.format(a=adapter)}"))
    decoder = install(monkeypatch, StubDecoder(perfect))
    resumed = f"resume={tmp_path / 'out'}"
    results = evaluate(
        eval_config(tmp_path / "again", *overrides, f"adapters={again.format(a=adapter)}", resumed)
    )
    label = label.format(a=adapter)
    assert decoder.rows == []  # nothing decoded again
    assert list(results) == ["base", label]
    assert {r["model"] for r in read_predictions(tmp_path / "out")} == {"base", label}
    assert f"| metric (%) | base | {label} | Δ vs base |" in (tmp_path / "out" / "results.md").read_text()


def test_one_folder_named_twice_is_one_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    cfg = eval_config(tmp_path / "out", f"adapters=[{adapter}/,./adapter,{adapter}]")
    assert list(vrft.evaluate.evaluated_models(cfg)) == ["base", str(adapter)]


@pytest.mark.parametrize("override", ["batch_size=0", "max_new_tokens=-1", "max_rows=0"])
def test_a_decoding_budget_below_one_is_named_before_loading(tmp_path, monkeypatch, override):
    decoder = install(monkeypatch, StubDecoder(perfect))
    key, value = override.split("=")
    unset = ", or null for every row" if key == "max_rows" else ""
    with pytest.raises(ValueError, match=rf"^{key}={value} must be an integer >= 1{unset}, e.g. {key}=8$"):
        run(tmp_path, "classification", "disk", None, override)
    assert decoder.rows == []


@pytest.mark.parametrize(
    "precision, packed, mma, expected",
    [
        ("int4", None, None, "packed"),
        ("int4", None, "VRFT_NF4_MMA=0", "bf16_copy"),  # nf4_matmul's kernel alone is the slower
        ("int4", "no Triton", None, "bf16_copy"),
        ("bf16", "no 4-bit weights", None, "bf16_copy"),
    ],
)
def test_auto_decodes_a_4bit_base_with_packed_where_nf4_mma_serves_it(
    monkeypatch, precision, packed, mma, expected
):
    # (this machine has no CUDA: the reasons are pretended, as the planner's test does)
    monkeypatch.setattr(vrft.evaluate, "packed_unavailable", lambda name, cfg: packed or None)
    monkeypatch.setattr(vrft.evaluate, "mma_unavailable", lambda rows: mma)
    plugin = instantiate(eval_config("unused", f"precision={precision}").precision)
    assert plugin.name == precision  # what `decode` passes: the trainer's precision plugin's mode
    assert vrft.evaluate.auto_engine(plugin.name, {}, "cuda", 8) == expected
    assert vrft.evaluate.auto_engine(plugin.name, {}, "cpu", 8) == "hf"


def test_auto_decodes_batches_wider_than_nf4_mma_takes_with_the_bf16_copy(monkeypatch):
    # batch_size rows decode together; over 32 the packed engine's matmuls would go to nf4_matmul's kernel
    # (pretended available: this machine has no CUDA)
    monkeypatch.setattr(vrft.evaluate, "packed_unavailable", lambda name, cfg: None)
    monkeypatch.setattr(nf4_mma, "environment_unsupported", lambda: None)
    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", True)
    assert vrft.evaluate.auto_engine("int4", {}, "cuda", 32) == "packed"
    assert vrft.evaluate.auto_engine("int4", {}, "cuda", 33) == "bf16_copy"


@pytest.mark.gpu
def test_auto_decodes_a_4bit_base_on_a_gpu_with_the_packed_weights(tmp_path):
    # The real decoder, greedy, on the tiny model: what the test above pretends, on the machine it is for
    results, _ = run(tmp_path, "classification", "disk", None, "precision=int4", "trainer.accelerator=gpu")
    speed = json.loads((tmp_path / "out" / "metrics.json").read_text())["speed"]
    assert speed["base"]["rollout_engine"] == "packed", speed
    assert "accuracy" in results["base"]
    assert len(read_predictions(tmp_path / "out")) == len(schema_rows("classification"))


def test_a_bad_nf4_mma_switch_is_named_before_loading_when_the_engine_may_be_packed(tmp_path, monkeypatch):
    decoder = install(monkeypatch, StubDecoder(perfect))
    monkeypatch.setenv("VRFT_NF4_MMA", "yes")
    for engine in ("packed", "auto"):
        with pytest.raises(ValueError, match="VRFT_NF4_MMA='yes' is neither 0 nor 1"):
            run(tmp_path / engine, "classification", "disk", None, f"rollout_engine={engine}")
    assert decoder.rows == []


def test_a_misspelt_engine_is_named_by_its_key_before_loading(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although rollout_engine names no engine")

    monkeypatch.setattr(vrft.evaluate, "build_run", must_not_load)
    listed = r"\['bf16_copy', 'dequant', 'hf', 'packed', 'auto'\]"
    with pytest.raises(ValueError, match=rf"^rollout_engine='fast' is not one of {listed}; hf is plain"):
        run(tmp_path, "classification", "disk", None, "rollout_engine=fast")


@pytest.mark.parametrize("content", [None, b"not a checkpoint\n"], ids=["missing", "garbage"])
def test_an_unreadable_checkpoint_is_named_before_any_row_is_decoded(tmp_path, monkeypatch, content):
    # It used to be found only when its column came, after the base model had decoded every row (and a
    # garbage file ended in torch's unpickling traceback).
    decoder = install(monkeypatch, StubDecoder(perfect))
    path = tmp_path / "last.ckpt"
    if content is not None:
        path.write_bytes(content)
    reason = "is not a file" if content is None else "is not a readable Lightning checkpoint"
    with pytest.raises(ValueError, match=rf"^ckpt_path='{path}' {reason}"):
        run(tmp_path, "classification", "disk", None, f"ckpt_path={path}")
    assert decoder.rows == []


def test_a_checkpoint_of_a_warm_started_run_evaluates_with_the_adapter_it_trained(tmp_path, monkeypatch):
    # `make train` trains the warm start's adapter (r=16, lm_head too), not the lora node's r=64: the
    # checkpoint's own shape is built, where the lora node's used to fail its load after the base's rows.
    cfg = train_config()  # the default run, whose warm start applies
    spec = instantiate(cfg.warm_start.lora)  # the adapter it trains: the warm start's recipe
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    torch.manual_seed(0)
    trained = {
        f"policy.{name}": torch.randn_like(parameter)
        for name, parameter in get_peft_model(base, spec.peft_config()).named_parameters()
        if "lora_" in name
    }
    path = tmp_path / "last.ckpt"
    written = {"pytorch-lightning_version": lightning.__version__, "global_step": 5, "epoch": 0}
    torch.save({**written, "state_dict": trained, CHECKPOINT_KEY: resume_settings(cfg)}, path)
    policies = []

    class Recording(StubDecoder):
        def __call__(self, policy, *args, **kwargs):
            policies.append(policy)
            return super().__call__(policy, *args, **kwargs)

    decoder = install(monkeypatch, Recording(perfect))
    results, _ = run(tmp_path, "classification", "disk", None, f"ckpt_path={path}")
    assert set(results) == {"base", str(path)}
    assert len(decoder.rows) == 2 * len(schema_rows("classification"))  # every row, by both models
    loaded = dict(policies[-1].named_parameters())
    key = "base_model.model.lm_head.lora_A.default.weight"
    assert torch.equal(loaded[key], trained[f"policy.{key}"])  # the checkpoint's weights, at its rank 16


def test_a_resume_that_fails_mid_rewrite_keeps_every_prediction(tmp_path, monkeypatch):
    # PredictionLog rewrote predictions.jsonl in place on resume: a stop or a full disk then lost the rows
    path = tmp_path / "predictions.jsonl"
    lines = "".join(json.dumps({"model": "base", "row_index": i}) + "\n" for i in range(3))
    path.write_text(lines + '{"model": "base", "row_ind')  # the cut line a resume drops

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        PredictionLog(path)
    assert path.read_text() == lines + '{"model": "base", "row_ind'
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]  # no partial file left behind
    monkeypatch.undo()
    assert PredictionLog(path).done("base") == {0, 1, 2} and path.read_text() == lines


def test_results_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # evaluation.json, metrics.json and results.md were written in place: a stop mid-write left them cut
    install(monkeypatch, StubDecoder(perfect))
    run(tmp_path, "detection")
    out = tmp_path / "out"
    written = {name: (out / name).read_text() for name in ("evaluation.json", "metrics.json", "results.md")}
    replace = os.replace
    for name in written:

        def disk_full(source, target, name=name):
            if Path(target).name == name:
                raise OSError(28, "No space left on device")
            replace(source, target)

        monkeypatch.setattr(os, "replace", disk_full)
        with pytest.raises(OSError, match="No space left"):
            data = ["data=disk", f"data.path={tmp_path / 'data-disk'}"]
            evaluate(eval_config(tmp_path / "again", "task=detection", *data, f"resume={out}"))
        assert (out / name).read_text() == written[name]
    assert not list(out.glob(".*.partial"))
