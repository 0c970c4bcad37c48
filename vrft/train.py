"""`python -m vrft.train`: compose the config, build module, data, precision and trainer, and fit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import datasets
import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vrft.callbacks import RunConfigLogging, RunSettingsInCheckpoint, RunSummary
from vrft.cli import check_composes, check_sweep, config_hash, is_basic_sweeper, user_errors
from vrft.data.datamodule import text_faults
from vrft.data.loading import check_template_fields, load_visual_rft
from vrft.distributed import check_distributed, check_strategy
from vrft.loggers import check_wandb_login
from vrft.paths import config_dir
from vrft.planner.planning import budget_gb, plan_config, precision_name, resolve_auto
from vrft.planner.report import enforce_plan
from vrft.quiet import silence_upstream_noise
from vrft.resume import (
    CHECKPOINT_KEY,
    check_fresh_run,
    check_resume,
    compare_settings,
    resume_settings,
    starting_adapter,
)
from vrft.runtime.checkpoint_io import check_writable
from vrft.runtime.cuda import apply_memory_cap, configure_allocator
from vrft.runtime.failures import internal_failure
from vrft.runtime.interrupt import stops_between_steps
from vrft.runtime.oom import explain_out_of_memory
from vrft.runtime.ranks import stop_other_ranks
from vrft.setup import build_run
from vrft.validation import check_command_line, check_settings, validate
from vrft.warmstart import apply_warm_start

log = logging.getLogger(__name__)
silence_upstream_noise()


def planner_prediction(cfg: DictConfig, verdict=None) -> dict:
    """The memory planner's prediction for `cfg` (the enforced verdict's plan when there is one)."""
    try:
        plan = verdict.plan if verdict is not None else plan_config(cfg)
    except Exception as error:  # a prediction is a nicety of the dashboard, never a reason to stop a run
        log.info("planner prediction not logged: %s", error)
        return {}
    budget, source = budget_gb(cfg)
    return {
        "device_gb": round(plan.device_gb, 3),
        "peak_phase": plan.peak_phase,
        "budget_gb": budget,
        "budget_source": source,
        "components_gb": {name: round(value, 3) for name, value in plan.components_gb().items()},
    }


def dataset_on_disk(cfg: DictConfig) -> datasets.DatasetDict | None:
    """The dataset at `data.path`, loaded once for the checks before training; None for the synthetic data,
    or a missing `data.path` (the data module's to name)."""
    path = OmegaConf.select(cfg, "data.path", default=None)
    if path is None or not Path(str(path)).expanduser().exists():
        return None
    return load_visual_rft(str(path))


def check_prompt_fields(cfg: DictConfig, dataset: datasets.DatasetDict | None = None) -> None:
    """`algorithm.prompt_template` names columns of the dataset on disk (`data.path`; `dataset` where it is
    loaded already), before anything loads; for the synthetic data, only its braces."""
    template = OmegaConf.select(cfg, "algorithm.prompt_template", default=None)
    if template is None:
        return
    path = OmegaConf.select(cfg, "data.path", default=None)
    if path is not None and not Path(str(path)).expanduser().exists():
        return
    check_template_fields(str(template), None if path is None else str(path), dataset=dataset)


def check_validation_rows(cfg: DictConfig, dataset: datasets.DatasetDict | None) -> None:
    """The validation split (`data.val_split`) against the task's metric, before anything loads: the metric
    first runs at the first validation, after training steps, where a detection row that asks about no
    category stopped the run and a misspelt `task.evaluator.categories` made `val/map` NaN. Only the text
    columns are read, of the rows the data module keeps (`vrft.data.datamodule.text_faults`): the others are
    its to name, or to drop under `data.on_bad_row=skip`."""
    split = OmegaConf.select(cfg, "data.val_split", default=None)
    node = OmegaConf.select(cfg, "algorithm.evaluator", default=None)
    if dataset is None or split is None or split not in dataset or node is None:
        return  # synthetic data, no validation or no metric; a missing split is the data module's to name
    check_rows = getattr(instantiate(node), "check_rows", None)  # a task's own evaluator may have none
    if check_rows is None:
        return
    table = dataset[split]
    limit = OmegaConf.select(cfg, "data.max_val_rows", default=None)
    count = len(table) if limit is None else min(limit, len(table))
    check_solution = OmegaConf.select(cfg, "data.check_solution", default=None)
    faults = text_faults(table, count, None if check_solution is None else instantiate(check_solution))
    columns = [c for c in ("problem", "solution", "category") if c in table.column_names]
    text = table.select_columns(columns)[:count]
    rows = [{**{c: text[c][i] for c in columns}, "row_index": i} for i in range(count) if i not in faults]
    check_rows(rows, split)


def warn_gpu_profile_without_gpu(cfg: DictConfig) -> None:
    """A GPU profile (`+hw=rtx4090`) on a machine where torch sees no GPU trains on the CPU: say so at the start,
    not after an hour of one step a minute."""
    memory = OmegaConf.select(cfg, "hw.memory_gb", default=None)
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if memory is None or accelerator not in ("auto", "gpu", "cuda") or torch.cuda.is_available():
        return
    log.warning(
        "hw=%s describes a %s GB GPU, but torch sees none (torch.cuda.is_available() is False): the run goes "
        "on on the CPU, far slower than the profile's figures; install a CUDA build of torch, or drop +hw",
        OmegaConf.select(cfg, "hw.name", default="?"),
        memory,
    )


def fit(cfg: DictConfig) -> tuple[L.Trainer, L.LightningModule, RunSummary]:
    """Build the run described by `cfg` and fit it; returns the trainer, the module and the run summary."""
    # validate(cfg), its two halves: every setting, and the checkpoint to resume from, before anything loads;
    # the checkpoint's index is read once, and what it records kept for the comparison after precision=auto
    check_settings(cfg)
    ckpt_path = None if cfg.get("ckpt_path") is None else Path(str(cfg.ckpt_path))
    saved = None if ckpt_path is None else check_resume(cfg, ckpt_path)
    configure_allocator()  # expandable segments, before anything touches CUDA
    warn_gpu_profile_without_gpu(cfg)
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir)  # before the model loads (or a warm start trains): a full disk fails now
    check_fresh_run(cfg)  # a run started again without ckpt_path= would overwrite the folder's checkpoints
    check_distributed(cfg)  # devices, strategy and prompt split of a multi-process run, before loading
    check_wandb_login(cfg)  # W&B credentials, before a warm start trains (wandb asks only at setup)
    on_disk = dataset_on_disk(cfg)  # one load for the checks of the prompt's fields and the held-out split
    check_prompt_fields(cfg, on_disk)  # the prompt template's fields, against the dataset's columns
    check_validation_rows(cfg, on_disk)  # the validation rows against the task's metric
    auto_precision = precision_name(cfg.precision) == "auto"
    cfg = resolve_auto(cfg)  # precision=auto / rollout_engine=auto -> what the planner says fits
    if auto_precision and saved is not None:
        # check_resume could not compare precision=auto with the checkpoint's: compare what auto picked
        compare_settings(cfg, saved, ckpt_path)
    check_strategy(cfg.trainer, cfg.precision)  # again, for the precision `auto` chose
    verdict = enforce_plan(cfg)  # refuse, before the model loads, a run the planner says will not fit
    apply_memory_cap(cfg.get("memory_cap_gb"))  # a bigger GPU behaves like the profile's card
    # sets lora.init_adapter (made once, then cached)
    warm_start_callbacks = apply_warm_start(cfg, None if on_disk is None else list(on_disk))
    del on_disk  # the data module loads its own (a memory-mapped folder, or JSON parsed once more)
    start = starting_adapter(cfg)
    if start is not None:
        log.info(
            "training the adapter at lora.init_adapter=%s with its own r=%s, alpha=%s and targets (lora.r, "
            "lora.alpha and lora.target_modules shape fresh adapters only)",
            cfg.lora.init_adapter,
            start.r,
            start.lora_alpha,
        )
    summary = RunSummary(
        run_dir,
        info={
            "config_hash": config_hash(cfg),
            "model": cfg.model.name_or_path,
            "precision": precision_name(cfg.precision),
            "task": cfg.task.name,
            "algorithm": cfg.algorithm._target_,
            "seed": cfg.seed,
            "run_dir": str(run_dir),
            "resumed_from": cfg.ckpt_path,
        },
    )
    described = RunConfigLogging(cfg, planner_prediction(cfg, verdict))  # hyperparameters for the loggers
    resume_guard = RunSettingsInCheckpoint(resume_settings(cfg), CHECKPOINT_KEY)
    run = build_run(cfg, [summary, resume_guard, described, *warm_start_callbacks])
    trainer, module = run.trainer, run.module
    if rank_zero_only.rank == 0:  # Lightning's launcher runs this script once per rank: one writer
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    try:
        with stops_between_steps():  # a first Ctrl-C stops after the running step and checkpoints it
            trainer.fit(module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)
    except torch.OutOfMemoryError as error:
        explained = explain_out_of_memory(
            error,
            module,
            run_dir,
            trainer.global_step,
            trainer.global_rank if trainer.world_size > 1 else None,
        )
        stop_other_ranks(trainer)  # the others would wait for this rank in their next collective
        # Raised in the except block (not `from`): the CLI prints this message, VRFT_TRACEBACK shows both.
        raise explained  # noqa: B904
    except Exception as error:
        failure = internal_failure(error, module, trainer)
        if failure is None:
            raise
        raise failure from error
    return trainer, module, summary


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by `cfg`; prints where its outputs are and returns the final metrics."""
    trainer, _, summary = fit(cfg)
    info = summary.summary
    checkpoints = info.get("checkpoint_dir")
    if checkpoints is None or not any(Path(checkpoints).glob("*.ckpt")):
        # save_top_k=0 with save_last=false, or a run shorter than every_n_train_steps without save_last
        checkpoints = "none kept (callbacks.checkpoint: save_top_k, save_last, every_n_train_steps)"
    print(
        f"\nrun folder: {cfg.run_dir}\n  metrics: {info.get('metrics_dir')}\n"
        f"  checkpoints: {checkpoints}\n  adapter: {Path(cfg.run_dir) / 'adapter' / 'final'}\n"
        f"  summary: {summary.path}\n  curves: {Path(cfg.run_dir) / 'curves.png'}  (python -m vrft.report <run>)"
    )
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def optimizing_sweeper() -> str | None:
    """The `_target_` of the Hydra sweeper running this job where it optimises the job's return value (a
    multirun of `hparams_search=tiny_optuna`); None for a single run or the basic sweeper's grid."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return None if is_basic_sweeper(target) else target


def optimized_value(cfg: DictConfig, metrics: dict[str, float], sweeper: str | None) -> float | None:
    """The job's `optimized_metric` from its final `metrics`.

    A sweeper that optimises it (`sweeper`) needs a number: without this check a misspelt name (or one the
    algorithm does not log: `algorithm=sft` has no `train/reward`) trained the trial and then failed in the
    sweeper, as "Return value must be float-castable. Got 'None'" and a traceback, naming no metric.
    """
    name = cfg.get("optimized_metric")
    if name is None or name in metrics or sweeper is None:
        return metrics.get(name)
    raise ValueError(
        f"optimized_metric={name!r} is not a metric this run logged, so the sweeper ({sweeper}) has no value "
        f"to optimise; set optimized_metric to one of: {', '.join(sorted(metrics))}"
    )


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@user_errors
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the metric a sweep optimises (`optimized_metric`)."""
    metrics = train(cfg)
    return optimized_value(cfg, metrics, optimizing_sweeper())


if __name__ == "__main__":
    user_errors(check_command_line)(sys.argv[1:])  # before Hydra parses the overrides
    user_errors(check_composes)("train", sys.argv[1:])
    user_errors(check_sweep)("train", sys.argv[1:], validate)  # every job of a -m sweep, before the first
    main()
