"""What the command line asks, checked against what vrft reads: overrides Hydra would reject without naming
the fix, Lightning flags that vrft owns, and `+key` additions that nothing reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from vrft.paths import config_dir
from vrft.validation.spelling import closest

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


def check_added_keys(cfg: DictConfig, config_name: str, overrides: Sequence[str]) -> None:
    """`+key=value` overrides that add a key nothing reads (Hydra adds any key with `+`): a typo'd
    `+max_steps=5` would train with the default `trainer.max_steps`. A key is known when the config composed
    from conf/ without the user's `+key` additions has it (the one extra composition); keys added under a
    node with a `_target_`, or nodes with their own `_target_`, are left to `_check_target`, which checks them
    against the target's signature. Config-group selections (`+hw=rtx4090`, `+experiment=...`) are not keys."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    added = [
        override
        for override in parsed
        if (override.is_add() or override.is_force_add())
        and override.package is None
        and not override.key_or_group.startswith("hydra")
        and not (config_dir() / override.key_or_group.replace(".", "/")).is_dir()  # a group, not a key
    ]
    if not added:
        return
    kept = [override.input_line for override in parsed if override not in added]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra run, or a caller's initialize block
        base = compose(config_name, overrides=kept)
    else:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            base = compose(config_name, overrides=kept)
    for override in added:
        key = override.key_or_group
        if OmegaConf.select(base, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT:
            continue
        parent = key.rpartition(".")[0]
        for node in (OmegaConf.select(cfg, parent) if parent else cfg, OmegaConf.select(cfg, key)):
            if isinstance(node, DictConfig) and "_target_" in node:
                break
        else:
            raise ValueError(
                _unknown_added_key(key, override.input_line, _dotted_keys(base, ""), config_name)
            )


_ABSENT = object()


def _unknown_added_key(key: str, line: str, known: list[str], config_name: str) -> str:
    name = key.rsplit(".", 1)[-1]
    trl = TRL_NAMES.get(name)
    if trl is not None and trl not in known:  # a TRL name with no single vrft key (max_prompt_length)
        return f"{key} is TRL's name, not a vrft setting ({line} adds a key nothing reads); vrft's setting is {trl}"
    close = [trl] if trl is not None else closest(key, known)
    fix = (
        f"did you mean {' or '.join(close)}?"
        if close
        else f"see the settings with python -m vrft.{config_name} --cfg job"
    )
    return f"{key} is not a vrft setting ({line} adds a key nothing reads); {fix}"


def _dotted_keys(node: DictConfig, prefix: str) -> list[str]:
    """Every key of `node` as a dotted path, nodes and leaves (interpolations are not resolved)."""
    keys = []
    for key in node:
        keys.append(f"{prefix}{key}")
        child = None if OmegaConf.is_interpolation(node, key) else node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            keys += _dotted_keys(child, f"{prefix}{key}.")
    return keys


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


# Hydra flags that compose from another config tree: its groups are not conf/'s, so Hydra names their options.
_OTHER_CONFIG_FLAGS = (
    "-cp",
    "-cn",
    "-cd",
    "--config-path",
    "--config-name",
    "--config-dir",
    "--experimental-rerun",
)


def check_config_groups(arguments: Sequence[str]) -> None:
    """Each config-group choice on the command line (`precision=int4`, `+hw=rtx4090`, `model@x=tiny`, each
    choice of a sweep `precision=int4,bf16` or a list `callbacks=[a,b]`) is an option in `conf/<group>/`,
    checked before Hydra composes: Hydra's own error spans a dozen lines ending in its config search path,
    and a sweep names the bad choice only once its job starts. The error names the choice, the group and its
    options, with the closest option where one is close. Deletions (`~group`), `null`, globs and keys that are
    not groups (`trainer.max_steps=3`) are left to Hydra, as is everything where the config tree is not
    conf/'s alone (`--config-dir`, `hydra.searchpath=...`)."""
    if any(argument.split("=")[0] in _OTHER_CONFIG_FLAGS for argument in arguments):
        return
    parser = OverridesParser.create()
    overrides = []
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        try:
            (override,) = parser.parse_overrides([argument])
        except OverrideParseException:
            continue  # Hydra names its grammar errors (check_command_line the common one)
        if override.key_or_group.startswith("hydra.searchpath"):
            return
        overrides.append(override)
    for override in overrides:
        group = override.key_or_group
        folder = config_dir() / group
        if override.is_delete() or override.is_hydra_override() or "." in group or not folder.is_dir():
            continue
        for choice in _group_choices(override):
            if not any((folder / f"{choice}{suffix}").is_file() for suffix in (".yaml", ".yml")):
                raise ValueError(_unknown_choice(override, choice, folder))


def _group_choices(override: Override) -> list[str]:
    """The options an override selects from its group: one, a list's, or a choice sweep's (not a glob's,
    which selects only options that exist). A value that is no option name (null, a number) is Hydra's."""
    if override.is_sweep_override():
        if not override.is_choice_sweep() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            return []
        return list(override.sweep_string_iterator())
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [choice for choice in values if isinstance(choice, str)]


def _unknown_choice(override: Override, choice: str, folder: Path) -> str:
    options = sorted({path.stem for path in folder.iterdir() if path.suffix in (".yaml", ".yml")})
    written = f"{override.get_key_element()}={choice}"
    where = f"{written} (in {override.input_line})" if override.input_line != written else written
    shown = "/".join(("conf", *folder.relative_to(config_dir()).parts))
    if not options:
        return f"{where}: {shown} holds no options"
    close = closest(choice, options)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{where}: no such option in {shown}; choose one of {', '.join(options)}{hint}"
