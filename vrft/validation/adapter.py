"""The adapter a run trains, checked before the model loads: the folder it starts from, and the modules a
fresh adapter targets (peft names either only once the weights have loaded, after a warm start)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vrft.evaluation.adapters import meta_model
from vrft.models.policy import ModelSpec, init_adapter_folder
from vrft.models.presets import PRESETS
from vrft.resume import starting_adapter


def check_init_adapter(folder: Any) -> None:
    """The adapter a run starts from, read only once the model has loaded (after a warm start)."""
    if folder is not None:
        init_adapter_folder(folder)


def check_target_modules(cfg: DictConfig, spec: ModelSpec | None) -> None:
    """The fresh adapter's `target_modules` regex matches a module of the model, built on the meta device
    (0.05 s for 7B; peft says so only once the weights have loaded). The adapter a run starts from brings its
    own targets; where that is the warm start's, its recipe's pattern is the one that makes it.

    `spec` is `cfg.model` as the settings check built it, None where it built none (no model node, or one
    that resolves only inside the run): then the run's own load names a bad pattern.
    """
    if spec is None or OmegaConf.select(cfg, "lora") is None:
        return
    start = "warm_start.lora" if OmegaConf.select(cfg, "lora.init_adapter", default=None) is None else None
    prefix = "lora" if starting_adapter(cfg) is None else start
    pattern = OmegaConf.select(cfg, f"{prefix}.target_modules", default=None) if prefix else None
    if not isinstance(pattern, str):
        return
    if (
        spec.name_or_path not in PRESETS
        and not (Path(spec.name_or_path).expanduser() / "config.json").is_file()
    ):
        return  # a model folder that is not there: the model's own check names it
    model = meta_model(spec)
    if any(re.fullmatch(pattern, name) for name, _ in model.named_modules()):
        return
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    example = next((name for name in linear if "language_model" in name), linear[0])
    raise ValueError(
        f"{prefix}.target_modules='{pattern}' matches no module of model.name_or_path='{spec.name_or_path}'; "
        f"it is a full-match regex over module names such as '{example}' (the default, ${{lora_targets:}}, "
        "adapts every language-model projection)"
    )
