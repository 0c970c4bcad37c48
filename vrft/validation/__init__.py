"""Every setting of a run checked before anything heavy (warm start, model, data) happens.

`validate(cfg)` runs both halves, `check_settings(cfg)` and `vrft.resume.check_resume`; `vrft.train.fit`
calls them first, keeping the checkpoint's settings that `check_resume` read. Each problem is a `ValueError`
whose one line names the key, the bad value and the fix (the CLI prints it and exits 2). What it checks:

- mandatory values left at `???` (`model=local` without `model.name_or_path`);
- keys a `+key=value` override adds where nothing reads them (`+max_steps=5` for `trainer.max_steps=5`):
  under a node with a `_target_` the target's signature decides; elsewhere the key must be one the config
  composed without the user's additions has;
- Lightning flags that vrft owns (`trainer.gradient_clip_val`, ...), pointing at vrft's setting;
- every config node with a `_target_`: keys the target does not take (`+algorithm.num_generations`,
  with TRL's names mapped to vrft's), and scalars of the wrong type (`optimizer.lr=fast`,
  `algorithm.group_size=abc`), read from the target's own signature and type hints;
- the settings dataclasses' own checks (`GRPOSettings`, `LoraSpec`, `ModelSpec` `__post_init__`);
- numbers outside what their consumer takes (`RANGES`: `trainer.max_steps`, `optimizer.lr`, `loss.beta`,
  `seed`, ...; under a node without a `_target_` also their type), `trainer.devices`, and the starting
  adapter (`lora.init_adapter`);
- `ckpt_path`: a readable Lightning checkpoint, trained with this run's model, LoRA shape and precision
  (`vrft.resume.check_resume`).

`check_settings(cfg)` is all of it but the checkpoint, for `vrft.evaluate`, which reads its `ckpt_path` as a
model to evaluate, not a run to resume.

`check_command_line` runs before Hydra parses the overrides: an unquoted `=` inside a value (a
checkpoint path such as `runs/lr=1e-3/last.ckpt`) is a Hydra grammar error that names no fix.

The command line's own checks are in `vrft.validation.overrides`, the starting adapter's in
`vrft.validation.adapter`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from vrft.resume import check_resume
from vrft.validation.adapter import check_init_adapter, check_target_modules
from vrft.validation.overrides import OWNED_TRAINER_FLAGS, TRL_NAMES, check_added_keys, check_command_line
from vrft.validation.spelling import closest

__all__ = ["check_added_keys", "check_command_line", "check_missing", "check_settings", "validate"]

_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def validate(cfg: DictConfig) -> None:
    """Raise `ValueError` (one line: key, value, fix) for the first bad setting of `cfg`."""
    check_settings(cfg)
    if cfg.get("ckpt_path") is not None:
        check_resume(cfg, Path(str(cfg.ckpt_path)))


def check_settings(cfg: DictConfig) -> None:
    """`validate` without the checkpoint to resume from: every setting, the `+key` overrides of the running
    Hydra job (none outside one), and the starting adapter."""
    check_missing(cfg)
    if HydraConfig.initialized():
        job = HydraConfig.get()
        check_added_keys(cfg, job.job.config_name, list(job.overrides.task))
    for flag, owner in OWNED_TRAINER_FLAGS.items():
        if flag in (cfg.get("trainer") or {}):
            raise ValueError(f"trainer.{flag} is set by vrft, not by Lightning; use {owner}")
    _check_ranges(cfg, "")  # first: `seed=abc` is named at seed, not at algorithm.rollout_seed=${seed}
    built = _check_node(cfg, "")
    _check_devices((cfg.get("trainer") or {}).get("devices"))
    _check_new_tokens(cfg)
    check_init_adapter(OmegaConf.select(cfg, "lora.init_adapter", default=None))
    check_target_modules(cfg, built.get("model"))


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
    # Lightning seeds numpy with it, whose seeds are unsigned 32-bit integers.
    ("", "seed"): (lambda v: isinstance(v, int) and 0 <= v < 2**32, "must be an integer in [0, 2**32 - 1]"),
    ("scheduler", "num_warmup_steps"): (lambda v: v >= 0, "must be >= 0 (0: no warmup)"),
    ("algorithm", "min_new_tokens"): (lambda v: v >= 0, "must be >= 0 (0: a completion may stop at once)"),
    ("", "min_new_tokens"): (lambda v: v >= 0, "must be >= 0 (0: a completion may stop at once)"),
    # PolicyLoss checks them too, but only once built: after a warm start may have trained.
    ("loss", "beta"): (lambda v: v >= 0, "must be >= 0: 0 disables the KL penalty, Visual-RFT uses 0.04"),
    ("loss", "epsilon"): (lambda v: v > 0, "must be > 0 (PPO uses 0.2)"),
    ("loss", "epsilon_high"): (
        lambda v: v >= 0,
        "must be >= 0, or null for loss.epsilon (DAPO uses 0.28): below 0 the ratio's upper clip 1 + epsilon_high "
        "is under 1 and rows with a positive advantage get no gradient",
    ),
    # the planner's workload: a negative count shrinks the plan until any run "fits"
    ("plan", "prompt_text_tokens"): (
        lambda v: v >= 1,
        "must be >= 1: the chat template and question tokens of a prompt besides its image",
    ),
    ("plan", "image_tokens"): (
        lambda v: v >= 1,
        "must be >= 1, or null for the most an image can take (model.max_pixels / 784)",
    ),
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
        if rule is None or value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and not rule[0](value):
            raise ValueError(f"{prefix}{key}={value} {rule[1]}")
        if not number and "_target_" not in node:  # a target's node is typed by its signature (_check_type)
            raise ValueError(f"{prefix}{key}={value!r} is not a number; it {rule[1]}")


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


def _check_new_tokens(cfg: DictConfig) -> None:
    """`vrft.evaluate`'s own budget (GRPOSettings checks `algorithm.*`'s): generate would warn and stop at max."""
    low, high = cfg.get("min_new_tokens"), cfg.get("max_new_tokens")
    if (
        isinstance(low, int) and isinstance(high, int) and low > high >= 1
    ):  # a max below 1 is named by evaluate
        raise ValueError(
            f"min_new_tokens={low} exceeds max_new_tokens={high}; lower min_new_tokens or raise max_new_tokens"
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


def _check_node(node: DictConfig, prefix: str) -> dict[str, Any]:
    """Walk the config; check every `_target_` node against its target (interpolated nodes are skipped).

    Returns the settings objects built on the way by their key (`model`: the `ModelSpec`), for later checks
    that need one: building it again would repeat its `__post_init__` checks.
    """
    built = {}
    if "_target_" in node:
        settings = _check_target(node, prefix)
        if settings is not None:
            built[prefix.rstrip(".")] = settings
    for key in node:
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            built |= _check_node(child, f"{prefix}{key}.")
    return built


def _check_target(node: DictConfig, prefix: str) -> Any:
    """The node's keys and values against its target's signature; returns the settings object it built to
    run that object's own checks (None where it built none)."""
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
        return _build(settings, node, prefix, keys=[k for k in node if k in _parameters(settings)])
    if dataclasses.is_dataclass(target) and path.startswith("vrft."):
        return _build(target, node, prefix, keys=[k for k in node if k not in _HYDRA_KEYS])
    return None


def _unknown_key(full_key: str, key: str, target: str, params: dict) -> str:
    if key in TRL_NAMES and TRL_NAMES[key] != full_key:
        return f"{full_key} is TRL's name; vrft's setting is {TRL_NAMES[key]}"
    parent = full_key.rsplit(".", 1)[0]
    close = " or ".join(f"{parent}.{name}" for name in closest(key, params))
    hint = f"did you mean {close}? " if close else ""
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
    if typing.get_origin(hint) is typing.Literal:
        _check_choice(node, key, prefix, typing.get_args(hint))
        return
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


def _check_choice(node: DictConfig, key: str, prefix: str, choices: tuple) -> None:
    """A value a `Literal[...]` hint names (`data.on_bad_row`), refused only when its consumer is built."""
    try:
        value = node[key]
    except Exception:  # an interpolation that only resolves inside a Hydra run
        return
    if value not in choices:
        raise ValueError(f"{prefix}{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def _build(cls: type, node: DictConfig, prefix: str, keys: list[str]) -> Any:
    """Construct the settings dataclass from the node's scalars, so that its `__post_init__` checks run;
    returns it, or None where it cannot be built here."""
    values = {}
    for key in keys:
        try:
            value = node[key]
        except Exception:
            return None  # unresolvable here: the real run builds and checks it
        if isinstance(value, DictConfig | ListConfig):
            return None  # nested nodes are instantiated by Hydra; the dataclass is checked when it is built
        values[key] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"{prefix.rstrip('.')}: {error}") from None
    except ValueError as error:
        # The dataclasses name their usual place ("lora.r=0 ..."); name this node's (warm_start.lora.r).
        message = str(error)
        written = message.split("=", 1)[0]
        if "." in written and " " not in written:
            message = f"{prefix}{written.rsplit('.', 1)[1]}{message[len(written) :]}"
        raise ValueError(message) from None
