"""Resuming: the settings a checkpoint must share with the run that resumes from it, checked before loading.

`RunSettingsInCheckpoint` (vrft.callbacks) writes `resume_settings(cfg)` into every checkpoint;
`check_resume` reads them back (or the run folder's config.yaml for older checkpoints) and compares.
Lightning would otherwise fail deep inside `load_state_dict` with a tensor-shape traceback, after the
model has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig

from vrft.models.policy import is_adapter_folder
from vrft.warmstart import warm_start_skipped

# The settings a resumed run must share with its checkpoint (the LoRA shape, the base, how it is stored;
# `resume_settings` adds the precision's, the optimizer's and ALGORITHM_KEYS).
RESUME_KEYS = (
    "model.name_or_path",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "lora.train_vision",
    "lora.full",
)
CHECKPOINT_KEY = "vrft_resume"  # where RunSettingsInCheckpoint stores `resume_settings` in a .ckpt
# The adapter's shape. A run that starts from an adapter (lora.init_adapter, or a warm start) trains that
# adapter's shape, not the lora node's: these keys then hold the adapter's own values.
LORA_SHAPE_KEYS = ("lora.r", "lora.alpha", "lora.target_modules")
# The GRPO loop's settings that shape what a step trains: its completions (generation), their advantages and
# the update. With another value a resumed run trains its remaining steps unlike its first ones, while
# config.yaml, written again at the resume, records only the new value. The memory knobs (rollout_batch_size,
# update_micro_batch_size, logprob_chunk_size, rollout_engine) split the same work otherwise and may change
# on a resume, to fit another card; so may what is only watched (max_bad_steps, stall_steps, the samples).
ALGORITHM_KEYS = (
    "group_size",
    "temperature",
    "top_p",
    "max_new_tokens",
    "min_new_tokens",
    "prompt_template",
    "rollout_seed",
    "prompts_per_step",
    "num_iterations",
    "scale_rewards",
    "advantage_eps",
    "max_grad_norm",
    "rollout_is_cap",
)
# "adapter" or "fresh"; checkpoints of older vrft lack it, and their LORA_SHAPE_KEYS are the lora node's even
# where the run started from an adapter.
STARTS_FROM_KEY = "lora.starts_from"


def resume_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with a run that resumes from it (flat keys): the model, the LoRA
    shape, the precision, the optimizer and what the GRPO loop trains with (`ALGORITHM_KEYS`, the loss)."""
    settings = {key: OmegaConf.select(cfg, key) for key in RESUME_KEYS}
    start = starting_adapter(cfg)
    settings[STARTS_FROM_KEY] = "fresh" if start is None else "adapter"
    if start is not None:
        targets = start.target_modules
        if not isinstance(targets, str):  # a list in the adapter's config: peft keeps it as a set
            targets = sorted(targets)
        settings |= dict(zip(LORA_SHAPE_KEYS, (start.r, start.lora_alpha, targets), strict=True))
    algorithm = cfg.get("algorithm") or {}
    for key in ALGORITHM_KEYS:
        if key in algorithm:  # algorithm=sft has no rollout
            settings[f"algorithm.{key}"] = OmegaConf.select(cfg, f"algorithm.{key}")
    # The optimizer's too: Lightning restores its state from the checkpoint, learning rate and weight decay
    # included, so another value would be silently ignored (and another class fails to load that state). The
    # GRPO loss's (its class, KL weight, clipping) as the loop's settings: another value trains otherwise.
    for group in ("precision", "optimizer", *(["loss"] if "loss" in algorithm else [])):
        node = cfg.get(group)
        if node is not None:
            for key, value in OmegaConf.to_container(node, resolve=True).items():
                if not isinstance(value, dict | list):
                    settings[f"{group}.{key}"] = value
    return settings


def starting_adapter(cfg: DictConfig) -> LoraConfig | None:
    """The peft config of the adapter the run starts from, or None for a fresh adapter (or full fine-tuning).

    That is `lora.init_adapter`'s, or, where the warm start will apply (before it is made), the one its recipe
    (`warm_start.lora`) makes. Its r, alpha and targets are the ones the run trains.
    """
    if OmegaConf.select(cfg, "lora.full", default=False):
        return None
    folder = OmegaConf.select(cfg, "lora.init_adapter", default=None)
    if folder is not None:
        path = Path(str(folder)).expanduser()
        # a folder that is no adapter is named by vrft.models.policy.init_adapter_folder, in validation and
        # again where the adapter loads; a description of the run (the planner, a checkpoint's record) goes on
        return LoraConfig.from_pretrained(str(path)) if is_adapter_folder(path) else None
    if warm_start_skipped(cfg) is None:
        return instantiate(cfg.warm_start.lora).peft_config()
    return None


def checkpoint_lora(saved: dict | None) -> dict[str, Any]:
    """The LoRA settings (`lora.<key>`: value) a vrft checkpoint was trained with, from the settings that
    `check_resume` returns, to rebuild its adapter (`vrft.evaluate ckpt_path=`); empty where it records none."""
    lora = {key: value for key, value in (saved or {}).items() if key.startswith("lora.")}
    return {key.removeprefix("lora."): value for key, value in lora.items() if key != STARTS_FROM_KEY}


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(
            f"ckpt_path='{path}' is not a file; pass a Lightning checkpoint such as <run_dir>/checkpoints/last.ckpt"
        )
    try:
        # mmap: only the pickled index is read now, not the tensors; weights_only: a .ckpt is data, not code.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # truncated zip, empty file, text, a pickle of something else
        raise ValueError(
            f"ckpt_path='{path}' is not a readable Lightning checkpoint ({_unreadable(path, error)}); pass a .ckpt "
            "that a vrft run wrote, e.g. <run_dir>/checkpoints/last.ckpt"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path='{path}' holds no Lightning training state (no 'state_dict'); pass a .ckpt that a vrft "
            "run wrote, e.g. <run_dir>/checkpoints/last.ckpt"
        )
    return checkpoint


def _unreadable(path: Path, error: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    text = str(error)
    if "mmap can only be used" in text:  # torch's words for "not a torch.save zip archive"
        return "not a torch.save archive"
    if "central directory" in text:
        return "a truncated torch.save archive"
    return (text.strip().split(". ")[0] or type(error).__name__)[:120]


def check_resume(cfg: DictConfig, path: Path, training: bool = True) -> dict | None:
    """The checkpoint is readable, was trained with this run's model, LoRA, precision and rollout settings
    (`compare_settings`), and (`training`: a run that resumes it, not `vrft.evaluate`) leaves this run steps to
    train. Returns the settings it records (None for an older checkpoint with no config beside it): its index
    is read here only, and `checkpoint_lora` and the comparison after `precision=auto` resolves read these."""
    checkpoint = _read_checkpoint(path)
    if training:
        _check_steps_left(checkpoint.get("global_step"), OmegaConf.select(cfg, "trainer.max_steps"), path)
    saved = _saved_settings(checkpoint, path)
    # None: a checkpoint of an older vrft with no config beside it, which Lightning's own load checks
    if saved is not None:
        compare_settings(cfg, saved, path, training)
    return saved


def compare_settings(cfg: DictConfig, saved: dict, path: Path, training: bool = True) -> None:
    """Raise `ValueError` naming the checkpoint's value and the fix where `cfg` differs from the settings
    `saved` that `check_resume` read from the checkpoint at `path`. A `precision=auto` of `cfg` is not compared
    (it resolves later, with the planner: compare again then, with what it picked)."""
    current = resume_settings(cfg)
    auto = str(OmegaConf.select(cfg, "precision._target_", default="")).endswith("AutoPrecision")
    adapter_start = "adapter" in (current[STARTS_FROM_KEY], saved.get(STARTS_FROM_KEY))
    # an older record's LoRA keys are the lora node's, not the starting adapter's: nothing to compare them with
    old_record = STARTS_FROM_KEY not in saved and current[STARTS_FROM_KEY] == "adapter"
    for key, value in current.items():
        if key not in saved or key == STARTS_FROM_KEY or (auto and key.startswith("precision.")):
            continue
        if (key in LORA_SHAPE_KEYS and old_record) or (
            key.startswith(("lora.", "optimizer.", "algorithm.", "loss.")) and not training
        ):
            continue  # vrft.evaluate builds the checkpoint's own adapter (checkpoint_lora), and trains nothing
        if saved[key] != value:
            fix, other = f"{key}={saved[key]!r}", "drop ckpt_path to start a new run"
            if key.startswith("precision."):
                fix = "the precision it was trained with"
            elif key in LORA_SHAPE_KEYS and adapter_start:
                fix = "the adapter its run started from (the same lora.init_adapter, or the same warm_start)"
            elif key.startswith("optimizer."):
                # Lightning would restore the checkpoint's optimizer state over it, without a word
                other = (
                    "start a new run from its adapter (lora.init_adapter=<run>/adapter/step-N, no ckpt_path): "
                    "resuming restores the checkpoint's optimizer, its settings included"
                )
            elif key.startswith(("algorithm.", "loss.")):
                other = (
                    "start a new run from its adapter (lora.init_adapter=<run>/adapter/step-N, no ckpt_path) to "
                    "train on with another value: a resumed run goes on as its checkpoint's run trained"
                )
            raise ValueError(
                f"ckpt_path='{path}' was trained with {key}={saved[key]!r} but this run has {key}={value!r}; "
                f"resume with {fix}, or {other}"
            )


def _check_steps_left(step: Any, max_steps: Any, path: Path) -> None:
    # Lightning loads a checkpoint already at trainer.max_steps and stops at once: no training, no checkpoint,
    # no message, exit 0.
    if isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step:
        raise ValueError(
            f"ckpt_path='{path}' is at step {step} and trainer.max_steps={max_steps}: nothing is left to train; "
            f"raise trainer.max_steps above {step} to go on"
        )


def _saved_settings(checkpoint: dict, path: Path) -> dict | None:
    saved = checkpoint.get(CHECKPOINT_KEY)
    return _settings_beside(path) if saved is None else saved


def _settings_beside(path: Path) -> dict | None:
    # A run folder holds config.yaml next to checkpoints/ (vrft.train.fit saves it).
    config = path.parent.parent / "config.yaml"
    try:
        return resume_settings(OmegaConf.load(config)) if config.is_file() else None
    except Exception:  # an unreadable or foreign config: no comparison rather than a wrong one
        return None


def check_fresh_run(cfg: DictConfig) -> None:
    """A run without `ckpt_path` does not write over the checkpoints an earlier run left in its folder.

    Its `step-N.ckpt` and `last.ckpt` would replace theirs one by one: a run started again with the same
    `hydra.run.dir` and without `ckpt_path=` would silently lose the checkpoints it meant to resume from. Where
    the earlier run kept none, its final adapter is what would be lost. And a file where the checkpoints go
    would fail the run only when it first saves.
    """
    folder = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath", default=None)
    if cfg.get("ckpt_path"):
        return
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(
            f"callbacks.checkpoint.dirpath='{folder}' is a file, where the run's checkpoints go; point it at a "
            "folder (callbacks.checkpoint.dirpath=<folder>), or choose another hydra.run.dir"
        )
    if folder is None or not any(Path(folder).glob("*.ckpt")):
        _check_final_adapter(cfg)
        return
    last = Path(folder) / "last.ckpt"
    # the newest by time: by name, step-step=9.ckpt sorts after step-step=10.ckpt
    resume = last if last.is_file() else max(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    raise ValueError(
        f"'{folder}' already holds checkpoints of an earlier run, which this run would overwrite; resume it "
        f"with ckpt_path='{resume}', or choose another hydra.run.dir"
    )


def _check_final_adapter(cfg: DictConfig) -> None:
    adapters = OmegaConf.select(cfg, "callbacks.adapter.dirpath", default=None)
    final = Path(adapters) / "final" if adapters is not None else None
    if final is not None and final.is_dir() and any(final.iterdir()):
        # an earlier run that kept no checkpoint (callbacks.checkpoint.save_last=false, save_top_k=0) still
        # left its adapter, which this run's would replace
        raise ValueError(
            f"'{final}' already holds the final adapter of an earlier run, which this run would overwrite; "
            "choose another hydra.run.dir, or move that folder away first"
        )
