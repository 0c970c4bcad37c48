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
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from typing_extensions import override

from vrft.data.datamodule import RowDataset
from vrft.data.loading import load_visual_rft
from vrft.modules.presets import cache_root
from vrft.modules.rollout import generate_rollout

log = logging.getLogger(__name__)


def warm_start_key(cfg: DictConfig) -> str:
    """Hash of what determines the warm start: its own settings, the model, the data and the task.

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
    }
    # The data module's batch size follows the GRPO settings; the warm start sets its own.
    for key in ("batch_size", "val_split", "val_batch_size", "num_workers"):
        resolved["data"].pop(key, None)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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
        sft.trainer.enable_progress_bar = False
        # Only the adapter matters: no resumable checkpoints or samples for a run this short.
        sft.callbacks = {
            "adapter": {"_target_": "vrft.callbacks.AdapterExport", "dirpath": f"{run_dir}/adapter"}
        }
        sft.logger = {
            "_target_": "lightning.pytorch.loggers.CSVLogger",
            "save_dir": str(run_dir),
            "name": "logs",
            "version": "",
        }
    return sft


def fit_sft(sft: DictConfig) -> None:
    """Train the SFT run `sft` (from `sft_run_config`) and save its config next to its adapter."""
    from vrft.train import build_trainer  # train imports this module

    L.seed_everything(sft.seed, workers=True)
    precision = instantiate(sft.precision)
    datamodule = instantiate(sft.data)
    module = instantiate(sft.algorithm, _convert_="object")
    trainer = build_trainer(sft, precision)
    Path(sft.run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sft, Path(sft.run_dir) / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=datamodule)


@contextlib.contextmanager
def isolated_rng():
    """Restore the Python, NumPy and torch (CPU and CUDA) random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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
            shutil.rmtree(
                partial, ignore_errors=True
            )  # a failed or interrupted (Ctrl-C) build leaves nothing
    return adapter


def apply_warm_start(cfg: DictConfig) -> list[L.Callback]:
    """Point `cfg.lora.init_adapter` at the warm start of `cfg` when one applies; returns its callbacks.

    The warm start applies when `cfg.warm_start` is set, the model is one it is made for
    (`warm_start.models`) and the run does not already start from an adapter of the user's. The callbacks
    (`warm_start.callbacks`) report the reward before and after GRPO.
    """
    warm = cfg.get("warm_start")
    if not warm:  # warm_start=none (an empty node), or null
        return []
    name = cfg.model.name_or_path
    if name not in warm.models:
        log.info("warm start skipped: model '%s' is not in warm_start.models=%s", name, list(warm.models))
        return []
    if cfg.lora.get("init_adapter") is not None:
        log.info("warm start skipped: the run starts from lora.init_adapter=%s", cfg.lora.init_adapter)
        return []
    adapter = make_warm_start(cfg)
    with open_dict(cfg):
        cfg.lora.init_adapter = str(adapter)
    return [instantiate(node) for node in (warm.get("callbacks") or {}).values()]


class HeldOutReward(L.Callback):
    """The task's reward on held-out rows before and after fit: the evidence that GRPO learned.

    At fit start and end the policy samples `samples_per_row` completions (the GRPO rollout: same temperature
    and length) for each of the first `max_rows` rows of `split`, and one greedy completion for the task's
    evaluator. Both are printed with the first and last `train/reward`, kept in `self.results` and written to
    `<dirpath>/held_out.json`. With `measure_merged`, the end also scores the deployed model: each adapter
    merged into its base and quantised again with the run's scheme (`merge_and_requantize`), the figure that
    shows what quantisation-aware training buys. Sampling happens under a forked RNG, so the check does not
    change the training run.

    Args:
        split: split of the run's dataset to score (it must not be the training split to mean anything).
        max_rows: rows scored.
        samples_per_row: sampled completions per row.
        batch_size: rows per generation call.
        dirpath: folder of `held_out.json` (None: not written).
        measure_merged: also score the merged, re-quantised model at the end (a copy: the run is unchanged).
    """

    def __init__(
        self,
        split: str = "test",
        max_rows: int = 64,
        samples_per_row: int = 2,
        batch_size: int = 16,
        dirpath: str | None = None,
        measure_merged: bool = False,
    ):
        self.split = split
        self.max_rows = max_rows
        self.samples_per_row = samples_per_row
        self.batch_size = batch_size
        self.dirpath = dirpath
        self.measure_merged = measure_merged
        self.results: dict[str, dict[str, float]] = {}
        self._train_rewards: list[float] = []

    def rows(self, trainer: L.Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        dataset = load_visual_rft(datamodule.dataset_path())
        if self.split not in dataset:
            raise ValueError(
                f"warm_start.callbacks: split '{self.split}' is not in the dataset (splits: {list(dataset)}); "
                "set its split to a held-out split"
            )
        table = dataset[self.split]
        rows = RowDataset(table, list(range(min(self.max_rows, len(table)))))
        return [rows[i] for i in range(len(rows))]

    def measure(self, module, rows: list[dict]) -> dict[str, float]:
        """Mean sampled reward per reward name (and total), and the evaluator's metrics on greedy answers."""
        settings = module.settings
        sampling = dict(
            do_sample=True,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
        )
        greedy = dict(do_sample=False, max_new_tokens=module.eval_max_new_tokens)
        sums: dict[str, float] = {}
        count = 0
        greedy_completions: list[str] = []
        was_training = module.policy.training
        module.policy.eval()
        with isolated_rng():
            torch.manual_seed(0)  # the same samples before and after for an unchanged policy
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                args = (module.policy, module.processor, batch, module.prompt_template)
                sampled = generate_rollout(*args, self.samples_per_row, sampling, module.device)
                repeated = [row for row in batch for _ in range(self.samples_per_row)]
                columns = {k: [r[k] for r in repeated] for k in repeated[0] if k not in ("image", "solution")}
                total, per_reward = module.rewards(
                    sampled.completions, [r["solution"] for r in repeated], columns
                )
                for name, values in {**per_reward, "total": total}.items():
                    sums[name] = sums.get(name, 0.0) + float(values.sum())
                count += len(repeated)
                greedy_completions += generate_rollout(*args, 1, greedy, module.device).completions
        module.policy.train(was_training)
        metrics = {f"reward/{name}": value / count for name, value in sums.items()}
        if module.evaluator is not None:
            for key, value in module.evaluator(greedy_completions, rows).items():
                metrics[f"greedy/{key}"] = float(value)
        return metrics

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "rewards"):
            return  # an algorithm without rewards (SFT): nothing to compare
        self._rows = self.rows(trainer)
        # The precision plugin's autocast, as in validation: quantised and bf16 bases compute as in training.
        with trainer.precision_plugin.forward_context():
            self.results["before"] = self.measure(pl_module, self._rows)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reward = trainer.callback_metrics.get("train/reward")
        step = trainer.global_step
        if reward is not None and step > len(self._train_rewards):
            self._train_rewards.append(float(reward))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "before" not in self.results:
            return
        with trainer.precision_plugin.forward_context():
            self.results["after"] = self.measure(pl_module, self._rows)
            if self.measure_merged:
                self.results["merged"] = self.measure_deployed(pl_module)
        if self._train_rewards:
            self.results["train"] = {"first": self._train_rewards[0], "last": self._train_rewards[-1]}
        if trainer.is_global_zero:
            print(self.report())
            if self.dirpath is not None:
                path = Path(self.dirpath) / "held_out.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(
                    json.dumps({"split": self.split, "rows": len(self._rows), **self.results}, indent=2)
                )

    def measure_deployed(self, module) -> dict[str, float]:
        """`measure` on a merged, re-quantised copy of the policy (the model a user would deploy)."""
        from vrft.precision import merge_and_requantize

        trained = module.policy
        module.policy = merge_and_requantize(trained)
        try:
            return self.measure(module, self._rows)
        finally:
            module.policy = trained

    def report(self) -> str:
        """The before/after table as text."""
        before, after = self.results["before"], self.results["after"]
        merged = self.results.get("merged")
        lines = [
            f"\nheld-out '{self.split}' ({len(self._rows)} rows; sampled x{self.samples_per_row}, and greedy):",
            f"  {'metric':<22}{'before':>8}{'after':>8}{'change':>9}" + (f"{'merged':>9}" if merged else ""),
        ]
        for key in before:
            line = f"  {key:<22}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}"
            lines.append(line + (f"{merged[key]:>9.3f}" if merged else ""))
        train = self.results.get("train")
        if train:
            lines.append(
                f"  {'train/reward':<22}{train['first']:>8.3f}{train['last']:>8.3f}"
                f"{train['last'] - train['first']:>+9.3f}  (first and last optimizer step)"
            )
        return "\n".join(lines)
