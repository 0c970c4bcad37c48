"""The SFT warm start of the default run, and the held-out reward check that shows GRPO learns from it.

Visual-RFT starts GRPO from an instruction-tuned model that already answers in the right format. The built-in
`tiny` model has random weights: sampled at temperature 1 it emits noise that never earns a reward, so GRPO
would have nothing to learn from. Its stand-in for instruction tuning is a short SFT run on the run's own
training data (`conf/warm_start/tiny_sft.yaml`), deliberately stopped early so that GRPO starts from a partial
policy. The warm start is made once into the vrft cache, keyed by a hash of everything that determines it,
and GRPO then starts from its adapter (`lora.init_adapter`); `warm_start=none` trains from a fresh adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vrft.data.loading import load_visual_rft
from vrft.paths import cache_key, cache_root
from vrft.runtime.rng import isolated_rng
from vrft.setup import build_run

log = logging.getLogger(__name__)


# The environment that picks the CPU code torch, MKL and oneDNN run (the `Makefile`'s CPU_PINS): their
# AVX-512 / AMX code rounds sums otherwise than their AVX2 code, and the thread count splits the sums, so
# a warm start trained under other settings is another adapter (a `make train` after an unpinned run would
# otherwise reuse the unpinned run's warm start and print other figures).
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")


def warm_start_key(cfg: DictConfig) -> str:
    """Hash of what determines the warm start: its own settings, the model, the data, the task, and the
    environment variables that pick the CPU's arithmetic (`NUMERICS_ENV`).

    The GRPO phase's precision, optimizer, seed and steps are left out on purpose: every run that differs only
    in those starts from the same warm start (the precision comparison relies on that).
    """
    # Which models it applies to and how the GRPO run reports on it (callbacks) do not change the adapter.
    warm = cfg.warm_start
    resolved = {
        "warm_start": {
            key: OmegaConf.to_container(warm[key], resolve=True)
            if OmegaConf.is_config(warm[key])
            else warm[key]
            for key in warm
            if key not in ("callbacks", "models")
        },
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "task": cfg.task.name,
        "numerics": {name: os.environ.get(name) for name in NUMERICS_ENV},
    }
    # The data module's batch size follows the GRPO settings; the warm start sets its own.
    for key in ("batch_size", "val_split", "val_batch_size", "num_workers"):
        resolved["data"].pop(key, None)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    return cache_key(text)


def sft_run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config of the SFT run that makes the warm start of `cfg`, writing into `run_dir`."""
    sft = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sft):
        sft.run_dir = str(run_dir)
    # Resolved against the GRPO run first: the warm start's `${algorithm...}` mean the GRPO settings.
    sft = OmegaConf.create(OmegaConf.to_container(sft, resolve=True))
    warm = sft.warm_start
    with open_dict(sft):
        sft.seed = warm.seed
        sft.ckpt_path = None
        sft.algorithm = warm.algorithm
        sft.lora = warm.lora
        sft.optimizer = warm.optimizer
        sft.scheduler = None
        sft.precision = warm.precision
        sft.data.batch_size = warm.algorithm.batch_size
        sft.data.val_split = None
        sft.trainer.max_steps = warm.steps
        sft.trainer.val_check_interval = None
        # On one device, before any rank is launched: Lightning's launcher would otherwise start ranks for
        # this short run too, and they would go on to run the script again. The other ranks find it cached.
        sft.trainer.devices, sft.trainer.num_nodes, sft.trainer.strategy = 1, 1, "auto"
        # Only the adapter matters: no resumable checkpoints or samples for a run this short.
        sft.trainer.enable_checkpointing = False
        sft.callbacks = {
            "adapter": {"_target_": "vrft.callbacks.AdapterExport", "dirpath": f"{run_dir}/adapter"}
        }
        if (cfg.get("callbacks") or {}).get("progress"):  # the run shows bars: so does its warm start
            sft.callbacks.progress = {
                "_target_": "vrft.callbacks.StepProgressBar",
                "description": "warm start",
            }
        else:
            sft.trainer.enable_progress_bar = False
        sft.logger = {
            "csv": {
                "_target_": "lightning.pytorch.loggers.CSVLogger",
                "save_dir": str(run_dir),
                "name": "logs",
                "version": "",
            }
        }
    return sft


def fit_sft(sft: DictConfig) -> None:
    """Train the SFT run `sft` (from `sft_run_config`) and save its config next to its adapter."""
    run = build_run(sft)
    Path(sft.run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sft, Path(sft.run_dir) / "config.yaml", resolve=True)
    run.trainer.fit(run.module, datamodule=run.datamodule)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    # Parallel runs (a Hydra multirun, the precision comparison) wait for one builder instead of racing.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_warm_start(cfg: DictConfig) -> Path:
    """The warm start adapter folder of `cfg` (a peft adapter), trained on first use and cached."""
    folder = cache_root() / f"warmstart-{warm_start_key(cfg)}"
    adapter = folder / "adapter" / "final"
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if (adapter / "adapter_config.json").exists():
            log.info("warm start: reusing %s", adapter)
            return adapter
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"warm start: {cfg.warm_start.steps} SFT steps into {folder} (once; later runs reuse it)")
        try:
            # The GRPO run must not depend on whether its warm start was made now or reused: keep its RNG.
            with isolated_rng():
                fit_sft(sft_run_config(cfg, partial))
            partial.rename(folder)  # atomic: an interrupted build never looks finished
        finally:
            # A failed or interrupted (Ctrl-C) build leaves nothing behind; after the rename there is nothing.
            shutil.rmtree(partial, ignore_errors=True)
    return adapter


def apply_warm_start(cfg: DictConfig, splits: list[str] | None = None) -> list[L.Callback]:
    """Point `cfg.lora.init_adapter` at the warm start of `cfg` when one applies; returns its callbacks.

    The warm start applies when `cfg.warm_start` is set, the model is one it is made for
    (`warm_start.models`) and the run does not already start from an adapter of the user's. The callbacks
    (`warm_start.callbacks`) report the reward before and after GRPO. `splits`: the splits of the dataset on
    disk, where the caller has loaded it already.
    """
    skipped = warm_start_skipped(cfg)
    if skipped is not None:
        if cfg.get("warm_start"):
            log.info("warm start skipped: %s", skipped)
        return []
    warm = cfg.warm_start
    check_held_out_splits(cfg, splits)
    adapter = make_warm_start(cfg)
    with open_dict(cfg):
        cfg.lora.init_adapter = str(adapter)
    return [instantiate(node) for node in (warm.get("callbacks") or {}).values()]


def warm_start_skipped(cfg: DictConfig) -> str | None:
    """Why the warm start of `cfg` does not apply, or None where it does (see `apply_warm_start`)."""
    warm = cfg.get("warm_start")
    if not warm:  # warm_start=none (an empty node), or null
        return "no warm start is set (warm_start=none)"
    name = cfg.model.name_or_path
    if name not in warm.models:
        return f"model '{name}' is not in warm_start.models={list(warm.models)}"
    if cfg.lora.get("init_adapter") is not None:
        return f"the run starts from lora.init_adapter={cfg.lora.init_adapter}"
    return None


def check_held_out_splits(cfg: DictConfig, splits: list[str] | None = None) -> None:
    """The split each warm-start callback scores (`warm_start.callbacks.<name>.split`) is in the dataset on
    disk: checked before the warm start trains (minutes), where the callback would find it missing only once
    GRPO starts. A train-only dataset (`python -m vrft.data.build k-shot`) has none held out."""
    path = OmegaConf.select(cfg, "data.path", default=None)
    callbacks = OmegaConf.select(cfg, "warm_start.callbacks", default=None) or {}
    wanted = {name: node.get("split") for name, node in callbacks.items() if node.get("split")}
    if path is None or not wanted or not Path(str(path)).expanduser().exists():
        return  # synthetic data has its held-out split; a missing path is the data module's to name
    splits = list(load_visual_rft(str(path))) if splits is None else splits
    for name, split in wanted.items():
        if split not in splits:
            raise ValueError(
                f"warm_start.callbacks.{name}.split='{split}' is not in the dataset at data.path='{path}' "
                f"(splits: {splits}); set warm_start.callbacks.{name}.split=<a held-out split>, or warm_start=none"
            )
