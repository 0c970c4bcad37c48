"""`python -m vrft.evaluate`: greedy decoding on a split, the metric Visual-RFT reports, one before/after table.

Detection: COCO bbox mAP (IoU .50:.95 and .50) per class and averaged, with the model's confidence as score;
classification: accuracy with the reward's matching rule, per class and overall; grounding: mean IoU and
GIoU. The base model and every adapter of `adapters=[...]` are decoded in turn; each decoded batch goes to
`predictions.jsonl` at once (`resume=true` continues a half-done run), then `metrics.json` and
`results.md` hold one table with each adapter's difference to the base.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path, PurePath

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from vrft.cli import check_composes, user_errors
from vrft.data.loading import load_visual_rft
from vrft.evaluation.adapters import check_adapter
from vrft.evaluation.records import PredictionLog, PredictionWriter
from vrft.evaluation.rows import EvalRowDataset, EvalRows, prepare_rows
from vrft.evaluation.table import comparison_table
from vrft.kernels.nf4_matmul import check_mma_switch, mma_unavailable
from vrft.modules.scoring import RewardSet
from vrft.paths import config_dir, write_atomic
from vrft.resume import check_resume, checkpoint_lora
from vrft.rollout.engines import build_rollout_engine, check_rollout_engine
from vrft.rollout.packed import packed_unavailable
from vrft.setup import build_run
from vrft.validation import check_settings

log = logging.getLogger(__name__)

BASE = "base"


def evaluated_models(cfg: DictConfig) -> dict[str, dict]:
    """`{label: {"adapter", "ckpt_path"}}` in table order: the base model first, then each adapter (a folder
    named twice, in any spelling, once)."""
    listed = cfg.adapters or []
    if isinstance(listed, str):  # `adapters=<folder>` without brackets: one adapter, not its characters
        listed = [listed]
    adapters = [*([cfg.adapter] if cfg.adapter else []), *listed]
    models = {BASE: {"adapter": None, "ckpt_path": None}} if cfg.include_base else {}
    for adapter in map(str, adapters):
        if not any(same_folder(adapter, model["adapter"]) for model in models.values() if model["adapter"]):
            models[adapter_label(adapter)] = {"adapter": adapter, "ckpt_path": None}
    if cfg.ckpt_path:
        models[str(cfg.ckpt_path)] = {"adapter": None, "ckpt_path": str(cfg.ckpt_path)}
    if not models:
        raise ValueError(
            "include_base=false and no adapters= or ckpt_path=: name at least one model to evaluate"
        )
    return models


def adapter_label(spelling: str) -> str:
    """An adapter's row in the table and its `model` in predictions.jsonl: the folder as `adapters=` spells
    it, without a trailing `/` or a leading `./` (spellings without them keep the labels they always had)."""
    return str(PurePath(spelling))


def same_folder(spelling: str, other: str) -> bool:
    """Whether two spellings (relative or absolute, `~`, a trailing `/`) name the same folder."""
    return Path(os.path.expanduser(spelling)).resolve() == Path(os.path.expanduser(other)).resolve()


def saved_labels(models: dict[str, dict], saved: set[str]) -> dict[str, dict]:
    """`models` with each adapter under the label its folder already has in a resumed predictions.jsonl
    (`saved`): resuming with another spelling of the folder (absolute for relative, say) would decode its rows
    again and show it as a second adapter."""
    relabelled = {}
    for label, model in models.items():
        if model["adapter"] and label not in saved:
            same = sorted(s for s in saved - {BASE} if same_folder(s, model["adapter"]))
            label = same[0] if same else label
        relabelled[label] = model
    return relabelled


def load_rows(cfg: DictConfig) -> EvalRows:
    """The checked rows of `cfg.split` (raises, naming `split=`, when the dataset has no such split)."""
    path = instantiate(cfg.data).dataset_path()
    dataset = load_visual_rft(path)
    if cfg.split not in dataset:
        raise ValueError(
            f"dataset '{path}' has no split '{cfg.split}' (splits: {list(dataset)}); choose one with "
            f"split={next(iter(dataset))}"
        )
    check_solution = instantiate(cfg.task.check_solution) if cfg.task.get("check_solution") else None
    return prepare_rows(
        dataset[cfg.split], cfg.split, cfg.task.name, check_solution, cfg.on_bad_row, cfg.max_rows
    )


def output_dir(cfg: DictConfig) -> Path:
    """Where predictions and results go: the resumed folder (`resume=<folder>`) or this run's folder.

    The settings that decide what a prediction means are kept in `evaluation.json`; resuming with other
    settings, or starting afresh over existing predictions, is refused.
    """
    resume = cfg.resume
    out = Path(resume) if isinstance(resume, str) else Path(cfg.run_dir)
    data = cfg.data.path if cfg.data.get("path") else OmegaConf.to_container(cfg.data.synthetic, resolve=True)
    settings = {
        "model": cfg.model.name_or_path,
        "data": str(data),
        "split": cfg.split,
        "task": cfg.task.name,
        "max_rows": cfg.max_rows,
        "max_new_tokens": cfg.max_new_tokens,
        "prompt_template": cfg.algorithm.prompt_template,
        "precision": cfg.precision._target_,
    }
    saved_file = out / "evaluation.json"
    if resume and not saved_file.exists():
        raise FileNotFoundError(
            f"resume={resume}: '{out}' holds no evaluation.json; point resume= at an evaluation folder"
        )
    if resume:
        saved = json.loads(saved_file.read_text())
        for key, value in settings.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"resume: '{out}' was evaluated with {key}={saved.get(key)!r}, not {value!r}; resume with the "
                    f"same {key}, or evaluate into a new folder"
                )
    elif (out / "predictions.jsonl").exists():
        raise ValueError(
            f"'{out}' already holds predictions.jsonl; pass resume=true to continue it, or another hydra.run.dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved_file, json.dumps(settings, indent=2))
    return out


def auto_engine(precision: str, precision_cfg, device_type: str, rows: int) -> str:
    """What `rollout_engine=auto` decodes batches of `rows` with: `hf` off CUDA (the static engines pay off
    where kernel launches dominate); on CUDA `packed` for a 4-bit base where it runs with nf4_mma's kernel
    (faster than the bf16 copy, without its +2 bytes per weight: bench/rollout/results.md), else
    `bf16_copy`, as in training."""
    if device_type != "cuda":
        return "hf"
    packed_fits = packed_unavailable(precision, precision_cfg) is None
    return "packed" if packed_fits and mma_unavailable(rows) is None else "bf16_copy"


def decode(cfg: DictConfig, model: dict, dataset: EvalRowDataset, writer: PredictionWriter) -> str:
    """Greedy completions of `dataset` by one model (base + adapter or checkpoint), in batches of `batch_size`.

    Returns the rollout engine that decoded them.
    """
    cfg = copy.deepcopy(cfg)  # this model's LoRA, not the next one's
    with open_dict(cfg):
        cfg.lora.init_adapter = model["adapter"]
        cfg.lora = {**cfg.lora, **model.get("lora", {})}
    run = build_run(
        cfg,
        extra_callbacks=[writer],
        config_callbacks=False,
        logger=False,
        limit_val_batches=None,
        enable_progress_bar=False,  # the writer's bar counts rows
    )
    trainer, module = run.trainer, run.module
    module.evaluator = None  # the metric runs once over predictions.jsonl, resumed rows included
    module.eval_max_new_tokens = cfg.max_new_tokens
    engine = cfg.rollout_engine
    if engine == "auto":
        precision = str(getattr(trainer.precision_plugin, "name", ""))  # vrft's plugins name their mode
        engine = auto_engine(precision, cfg.precision, trainer.strategy.root_device.type, cfg.batch_size)
    module.eval_engine = build_rollout_engine(engine, "rollout_engine")
    if cfg.min_new_tokens:
        module.eval_generation = {"min_new_tokens": cfg.min_new_tokens}
    loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=list, num_workers=0)
    trainer.validate(module, dataloaders=loader, ckpt_path=model["ckpt_path"], verbose=False)
    return engine


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate the base model and each adapter of `cfg` on `cfg.split`; returns `{model: metrics}`."""
    check_settings(cfg)  # train's checks (but its ckpt_path's, read below as a model to evaluate)
    # before any model loads, not in the first batch; the text is what null means where it may be null
    for key, null in (("batch_size", None), ("max_new_tokens", None), ("max_rows", "every row")):
        value = cfg[key]
        if value is None and null:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            unset = f", or null for {null}" if null else ""
            raise ValueError(f"{key}={value!r} must be an integer >= 1{unset}, e.g. {key}=8")
    check_rollout_engine(cfg.rollout_engine, "rollout_engine")
    if cfg.rollout_engine in ("packed", "auto"):  # auto may pick packed once the model is loaded
        check_mma_switch()
    models = evaluated_models(cfg)
    spec = instantiate(cfg.model)
    for model in models.values():
        if model["adapter"]:
            check_adapter(model["adapter"], spec)
        if model["ckpt_path"]:  # readable, and of this model and precision: before any row is decoded
            saved = check_resume(cfg, Path(model["ckpt_path"]), training=False)
            # its adapter's shape is the one it trained (a warm start's r=16, say), whatever lora.* says here
            model["lora"] = checkpoint_lora(saved)
    rows = load_rows(cfg)
    evaluator = instantiate(cfg.task.evaluator)
    check_rows = getattr(evaluator, "check_rows", None)  # a task's own evaluator may have nothing to check
    if check_rows is not None:
        check_rows([rows.columns[i] for i in rows.indices], cfg.split)
    out = output_dir(cfg)
    predictions = PredictionLog(out / "predictions.jsonl")
    models = saved_labels(models, {record["model"] for record in predictions.records})
    rewards = RewardSet(instantiate(cfg.task.rewards))
    speed = {}
    for label, model in models.items():
        todo = [i for i in rows.indices if i not in predictions.done(label)]
        log.info("%s: %d of %d rows to decode", label, len(todo), len(rows.indices))
        if todo:
            writer = PredictionWriter(predictions, label, rewards, evaluator.answer, len(todo))
            engine = decode(cfg, model, EvalRowDataset(rows, todo), writer)
            speed[label] = {**writer.speed(), "rollout_engine": engine}
    kept = set(rows.indices)
    results = {}
    for label in models:
        records = [r for r in predictions.of(label) if r["row_index"] in kept]
        try:
            results[label] = {
                k: float(v) for k, v in evaluator([r["completion"] for r in records], records).items()
            }
        except Exception:
            log.error(
                "the metric failed; all %d predictions are in %s (rerun with resume=%s)",
                len(records),
                predictions.path,
                out,
            )
            raise
    return report(cfg, out, rows, results, speed)


def report(cfg: DictConfig, out: Path, rows: EvalRows, results: dict, speed: dict) -> dict:
    """Write `metrics.json` (with each decoding pass's rows/s) and `results.md`, print the table; returns `results`."""
    table = comparison_table(results, BASE)
    skipped = [index for index, _ in rows.bad]
    summary = {
        "task": cfg.task.name,
        "model": cfg.model.name_or_path,
        "split": cfg.split,
        "rows": len(rows.indices),
        "skipped_rows": skipped,
        "results": results,
        "speed": speed,  # rows/s of the passes this run decoded
    }
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2))
    write_atomic(out / "results.md", table + "\n")
    skipped_note = f", {len(skipped)} bad row(s) skipped" if skipped else ""
    print(f"\n{cfg.task.name} on split '{cfg.split}' ({len(rows.indices)} rows{skipped_note}):")
    print(table)
    print(f"predictions, metrics and table: {out}")
    return results


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point of `python -m vrft.evaluate`."""
    evaluate(cfg)


if __name__ == "__main__":
    user_errors(check_composes)("evaluate", sys.argv[1:])
    main()
