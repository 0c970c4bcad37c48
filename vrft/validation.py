"""Every setting of a run checked before anything heavy (warm start, model, data) happens.

`validate(cfg)` is the first call of `vrft.train.fit`; each problem is a `ValueError` whose one line
names the key, the bad value and the fix (the CLI prints it and exits 2). What it checks:

- mandatory values left at `???` (`model=local` without `model.name_or_path`);
- Lightning flags that vrft owns (`trainer.gradient_clip_val`, ...), pointing at vrft's setting;
- every config node with a `_target_`: keys the target does not take (`+algorithm.num_generations`,
  with TRL's names mapped to vrft's), and scalars of the wrong type (`optimizer.lr=fast`,
  `algorithm.group_size=abc`), read from the target's own signature and type hints;
- the settings dataclasses' own checks (`GRPOSettings`, `LoraSpec`, `ModelSpec` `__post_init__`);
- numbers outside what their consumer takes (`RANGES`: `trainer.max_steps`, `optimizer.lr`, ...) and
  `trainer.devices`;
- `ckpt_path`: a readable Lightning checkpoint, trained with this run's model, LoRA shape and precision
  (`vrft.resume.check_resume`).

`check_command_line` runs before Hydra parses the overrides: an unquoted `=` inside a value (a
checkpoint path such as `runs/lr=1e-3/last.ckpt`) is a Hydra grammar error that names no fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from vrft.resume import check_resume

# Lightning Trainer flags that vrft's loop replaces (manual optimisation, the precision plugin).
OWNED_TRAINER_FLAGS = {
    "gradient_clip_val": "algorithm.max_grad_norm (vrft clips the adapter's gradients itself)",
    "gradient_clip_algorithm": "algorithm.max_grad_norm (vrft clips by norm)",
    "accumulate_grad_batches": "algorithm.prompts_per_step (prompts accumulated into one optimizer step)",
    "precision": "the precision group, e.g. precision=bf16 or precision=int4",
}
# TRL GRPOConfig names a TRL user types, and vrft's key for each.
TRL_NAMES = {
    "num_generations": "algorithm.group_size",
    "max_completion_length": "algorithm.max_new_tokens",
    "max_prompt_length": "model.max_pixels (images) and the prompt template",
    "learning_rate": "optimizer.lr",
    "beta": "loss.beta",
    "epsilon": "loss.epsilon",
    "epsilon_high": "loss.epsilon_high",
    "gradient_accumulation_steps": "algorithm.prompts_per_step",
    "per_device_train_batch_size": "algorithm.rollout_batch_size",
    "max_steps": "trainer.max_steps",
    "seed": "seed",
}
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def validate(cfg: DictConfig) -> None:
    """Raise `ValueError` (one line: key, value, fix) for the first bad setting of `cfg`."""
    check_missing(cfg)
    for flag, owner in OWNED_TRAINER_FLAGS.items():
        if flag in (cfg.get("trainer") or {}):
            raise ValueError(f"trainer.{flag} is set by vrft, not by Lightning; use {owner}")
    _check_node(cfg, "")
    _check_ranges(cfg, "")
    _check_devices((cfg.get("trainer") or {}).get("devices"))
    if cfg.get("ckpt_path") is not None:
        check_resume(cfg, Path(str(cfg.ckpt_path)))


# Values whose consumer refuses them only once it is built (after a warm start may have trained), in its own
# words (Lightning's Trainer, torch's optimizers, the DataLoader), or takes them and trains wrongly: a
# negative gradient norm flips the gradients, a cosine schedule over -1 steps swings the learning rate
# between 0 and full. Keyed by a node's name and its key, wherever the node sits (`optimizer.lr` and
# `warm_start.optimizer.lr`): the test and the rule.
RANGES = {
    ("trainer", "max_steps"): (lambda v: v >= -1, "must be >= 0, or -1 for no limit (train by epochs)"),
    ("trainer", "max_epochs"): (lambda v: v >= -1, "must be >= 0, or -1 for no limit (train by steps)"),
    ("trainer", "num_nodes"): (lambda v: v >= 1, "must be >= 1"),
    ("optimizer", "lr"): (lambda v: v > 0, "must be > 0, e.g. 1e-5 (0 trains nothing)"),
    ("optimizer", "weight_decay"): (lambda v: v >= 0, "must be >= 0"),
    ("algorithm", "max_grad_norm"): (
        lambda v: v > 0,
        "must be > 0, or null for no clipping (a negative norm flips the gradients: torch scales them by it)",
    ),
    ("scheduler", "num_training_steps"): (
        lambda v: v >= 1,
        "must be >= 1: the cosine schedule's length in optimizer steps (it follows trainer.max_steps, -1 when "
        "training by epochs); set scheduler.num_training_steps=<steps>, or use scheduler=constant",
    ),
    ("checkpoint", "every_n_train_steps"): (lambda v: v >= 0, "must be >= 0 (0: none by step count)"),
    ("data", "num_workers"): (lambda v: v >= 0, "must be >= 0 (0: load in the main process)"),
    ("data", "val_batch_size"): (lambda v: v >= 1, "must be >= 1"),
    ("warm_start", "steps"): (lambda v: v >= 1, "must be >= 1, or warm_start=none for no warm start"),
}


def _check_ranges(node: DictConfig, prefix: str) -> None:
    name = prefix.rstrip(".").rsplit(".", 1)[-1]
    for key in node.keys() if isinstance(node, DictConfig) else ():
        try:
            value = node[key]
        except Exception:
            continue  # unresolvable here: the real run resolves and checks it
        if isinstance(value, DictConfig):
            if not OmegaConf.is_interpolation(node, key):  # (`algorithm.optimizer: ${optimizer}` is named
                _check_ranges(value, f"{prefix}{key}.")  # where it is set, at `optimizer`)
            continue
        rule = RANGES.get((name, key))
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if rule is not None and number and not rule[0](value):
            raise ValueError(f"{prefix}{key}={value} {rule[1]}")


def _check_devices(devices: Any) -> None:
    """`trainer.devices` as Lightning takes it: a count >= 1 or -1 (all), 'auto', a list of indices, or
    their text ('2', '0,1'); Lightning itself says so only once the Trainer is built, after a warm start."""
    if devices is None or isinstance(devices, ListConfig | list):
        return
    text = str(devices).strip()
    if isinstance(devices, bool) or text == "auto":
        return
    count = text.rstrip(",").split(",")
    if all(part.strip().lstrip("-").isdigit() for part in count) and (
        len(count) > 1 or int(count[0]) == -1 or int(count[0]) >= 1
    ):
        return
    raise ValueError(
        f"trainer.devices={devices!r} is not a device count; pass a count >= 1 (trainer.devices=2), -1 for every "
        "GPU, 'auto', or the GPUs' indices (trainer.devices=[0,1])"
    )


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values (`???`) left unset."""
    key = _first_missing(cfg, "")
    if key is None:
        return
    hint = {
        "model.name_or_path": "a local Qwen2-VL / Qwen2.5-VL folder, e.g. model.name_or_path=/models/Qwen2-VL-2B-Instruct",
        "data.path": "a dataset on disk, e.g. data.path=data/flower_4shot (README, 'Training on your data and checkpoint')",
    }.get(key, f"{key}=<value>")
    raise ValueError(f"{key} is not set (???); pass {hint}")


def _first_missing(node: DictConfig, prefix: str) -> str | None:
    # Not OmegaConf.missing_keys: it resolves interpolations, and ${hydra:...} resolves only inside a run.
    for key in node:
        if OmegaConf.is_missing(node, key):
            return f"{prefix}{key}"
        child = None if OmegaConf.is_interpolation(node, key) else node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            found = _first_missing(child, f"{prefix}{key}.")
            if found:
                return found
    return None


def _check_node(node: DictConfig, prefix: str) -> None:
    """Walk the config; check every `_target_` node against its target (interpolated nodes are skipped)."""
    if "_target_" in node:
        _check_target(node, prefix)
    for key in node:
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _check_node(child, f"{prefix}{key}.")


def _check_target(node: DictConfig, prefix: str) -> None:
    path = str(node["_target_"])
    try:
        target = get_object(path)
    except Exception as error:  # ImportError, AttributeError, whatever the import itself raises
        raise ValueError(
            f"{prefix}_target_='{path}' cannot be imported ({error}); fix the class path"
        ) from None
    params = _parameters(target)
    settings = getattr(target, "settings_class", None)
    if settings is not None:
        params.update(_parameters(settings))
    takes_any = settings is None and _has_var_keyword(target)
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key not in params:
            if takes_any:
                continue
            raise ValueError(_unknown_key(f"{prefix}{key}", key, path, params))
        _check_type(node, key, prefix, params[key])
    if settings is not None:
        _build(settings, node, prefix, keys=[k for k in node if k in _parameters(settings)])
    elif dataclasses.is_dataclass(target) and path.startswith("vrft."):
        _build(target, node, prefix, keys=[k for k in node if k not in _HYDRA_KEYS])


def _unknown_key(full_key: str, key: str, target: str, params: dict) -> str:
    if key in TRL_NAMES and TRL_NAMES[key] != full_key:
        return f"{full_key} is TRL's name; vrft's setting is {TRL_NAMES[key]}"
    close = difflib.get_close_matches(key, list(params), n=1)
    hint = f"did you mean {full_key.rsplit('.', 1)[0]}.{close[0]}? " if close else ""
    return f"{full_key} is not a setting of {target}; {hint}its settings: {', '.join(sorted(params))}"


def _parameters(target: Any) -> dict[str, tuple[Any, Any]]:
    """Name -> (type hint or None, default) of what `target` accepts by keyword."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable forward references: check the names only
        hints = {}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: (hints.get(name), parameter.default)
        for name, parameter in signature.parameters.items()
        if parameter.kind in kinds
    }


def _has_var_keyword(target: Any) -> bool:
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def _scalar_kind(hint: Any) -> tuple[type | None, bool]:
    """(int, float or bool the hint asks for, or None; whether None is allowed)."""
    if hint in (int, float, bool):
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        if str in args:  # "1" and 1 are both fine (e.g. CSVLogger's version: int | str)
            return None, True
        for kind in (bool, int, float):
            if kind in args:
                return kind, optional
    return None, True


def _check_type(node: DictConfig, key: str, prefix: str, param: tuple[Any, Any]) -> None:
    hint, default = param
    kind, optional = _scalar_kind(hint)
    if kind is None:
        return
    try:
        value = node[key]
    except Exception:  # an interpolation that only resolves inside a Hydra run (${hydra:...})
        return
    if value is None:
        if optional or default is None:
            return
        raise ValueError(f"{prefix}{key} is null; it needs a value of type {kind.__name__}")
    accepted = {bool: (bool,), int: (int,), float: (int, float)}[kind]
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return
    word = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    example = default if isinstance(default, accepted) and not isinstance(default, str) else None
    fix = (
        f"e.g. {prefix}{key}={str(example).lower() if kind is bool else example}"
        if example is not None
        else f"write {word}"
    )
    raise ValueError(f"{prefix}{key}={value!r} is not {word}; {fix}")


def _build(cls: type, node: DictConfig, prefix: str, keys: list[str]) -> None:
    """Construct the settings dataclass from the node's scalars, so that its `__post_init__` checks run."""
    values = {}
    for key in keys:
        try:
            value = node[key]
        except Exception:
            return  # unresolvable here: the real run builds and checks it
        if isinstance(value, DictConfig | ListConfig):
            return  # nested nodes are instantiated by Hydra; the dataclass is checked when it is built
        values[key] = value
    try:
        cls(**values)
    except TypeError as error:
        raise ValueError(f"{prefix.rstrip('.')}: {error}") from None
    except ValueError as error:
        # The dataclasses name their usual place ("lora.r=0 ..."); name this node's (warm_start.lora.r).
        message = str(error)
        written = message.split("=", 1)[0]
        if "." in written and " " not in written:
            message = f"{prefix}{written.rsplit('.', 1)[1]}{message[len(written) :]}"
        raise ValueError(message) from None


def check_command_line(arguments: Sequence[str]) -> None:
    """Overrides Hydra would reject without naming the fix: an unquoted `=` in a value, owned trainer flags."""
    parser = OverridesParser.create()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        flag = key.lstrip("+~").removeprefix("trainer.")
        if key.lstrip("+~").startswith("trainer.") and flag in OWNED_TRAINER_FLAGS:
            raise ValueError(
                f"trainer.{flag} is set by vrft, not by Lightning; use {OWNED_TRAINER_FLAGS[flag]}"
            )
        if "=" not in value:
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException:
            raise ValueError(
                f"override '{argument}' has '=' in its value, which Hydra reads as a second assignment; "
                f"""quote the value: "{key}='{value}'" (the double quotes keep the single ones from the shell)"""
            ) from None
