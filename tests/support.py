"""Helpers for tests that run the real CLI, and for tests of the benchmarks' scripts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def train_config(*overrides: str):
    """`conf/train.yaml` composed with `overrides`, as `python -m vrft.train` composes it (no Hydra run)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def bench_module(path: str):
    """A script under `bench/` (`path` from the repository root) imported as a module: `bench/` is not a
    package. Registered in `sys.modules` first, where its dataclasses look their module up."""
    name = "bench_" + "_".join(Path(path).with_suffix("").parts[1:])
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def length_reward(completions: list[str], solutions: list[str], **columns) -> list[float]:
    """A reward that varies across a random model's completions, so GRPO has a non-zero advantage."""
    return [len(completion) / 100 for completion in completions]


# Hydra overrides adding `length_reward` to the task's rewards.
LENGTH_REWARD = [
    "+task.rewards.length._target_=vrft.modules.scoring.WeightedReward",
    "+task.rewards.length.fn._target_=tests.support.length_reward",
    "+task.rewards.length.fn._partial_=true",
]


def bare_trainer(accelerator: str, max_steps: int, plugin, **options):
    """A one-device Lightning `Trainer` with `plugin` and nothing else: no logger, checkpoints, progress bar
    or model summary (`options` adds to it)."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
