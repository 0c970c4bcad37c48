"""What every vrft command does around its work: readable errors for bad input, and the config hash."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vrft.models.policy import LANGUAGE_MODEL_TARGETS
from vrft.models.presets import box_convention
from vrft.paths import cache_key, check_folder, config_dir, job_folder
from vrft.runtime.checkpoint_io import CheckpointWriteError
from vrft.runtime.failures import TrainingFailure
from vrft.runtime.interrupt import StopRecord, keyboard_stops
from vrft.validation.overrides import check_added_keys, check_config_groups

# `${box_convention:${model.name_or_path}}` lets a task follow the model's box coordinates.
OmegaConf.register_new_resolver("box_convention", box_convention, replace=True)
# `${lora_targets:}`: the one definition of which modules LoRA adapts (the language model's projections).
OmegaConf.register_new_resolver("lora_targets", lambda: LANGUAGE_MODEL_TARGETS, replace=True)
# `${job_folder:${hydra.job.override_dirname},${hydra.job.num}}`: multirun job folders named by their overrides.
OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)

# Errors that mean "the input is wrong": shown as one line naming the value and the fix, no traceback.
# A checkpoint that cannot be written (disk full, read-only folder) is the environment's problem: one line too.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, CheckpointWriteError)


def check_composes(config_name: str, arguments: Sequence[str]) -> None:
    """Hydra's own errors about a command line (a config-group option that does not exist, a key missing
    from the config without `+`) raised as input errors, so they exit 2 like vrft's: Hydra exits 1 on them,
    as on a crash. Composes the config once ahead of Hydra (a fraction of a second); a command line with
    Hydra flags (`--multirun`, `--cfg`, ...) is left to Hydra, whose sweeps compose per job; its config-group
    choices, a sweep's included, are checked all the same (`check_config_groups`)."""
    check_config_groups(arguments)
    if any(argument.startswith("-") for argument in arguments):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=list(arguments), return_hydra_config=True)
    except MissingConfigException as error:  # an option a config's own defaults list names
        raise ValueError(missing_config_message(error)) from None
    except HydraException as error:
        raise ValueError(str(error)) from None
    # Hydra makes the run folder before vrft's code runs: a file there ends in mkdir's traceback
    check_folder(Path(cfg.hydra.run.dir), "hydra.run.dir", "pass hydra.run.dir=<a folder>")


def missing_config_message(error: Exception) -> str:
    """Hydra's `MissingConfigException` in one line: its message without the config search path, the options
    it lists on one line (`check_config_groups` names the command line's own choices before this)."""
    head, _, _ = str(error).partition("\nConfig search path:")
    first, _, listed = head.partition("\n\nAvailable options in ")
    options = getattr(error, "options", None)
    if not listed or not options:
        return " ".join(first.split())
    group = listed.split(":", 1)[0]
    return f"{first.strip()}; the options in {group}: {', '.join(options)}"


def check_sweep(config_name: str, arguments: Sequence[str], check: Callable[[DictConfig], None]) -> None:
    """Each job of a multirun (`-m`, Hydra's basic sweeper) passes `check` and `check_added_keys` before the
    first job starts: Hydra composes a job only when it starts, so a bad value in the last job would be found
    after the others had trained. `check` alone cannot see a job's `+key` additions (a run's check reads them
    from the running Hydra job, and there is none yet): they are checked here from the job's overrides. A
    bad job is named with its overrides. Other sweepers (`hparams_search=...`) choose their jobs as they go:
    only what they optimise is checked (`check_optimized_metric`). Other Hydra flags are left to Hydra."""
    if not {"-m", "--multirun"} & set(arguments) or any(
        a.startswith("-") and a not in ("-m", "--multirun") for a in arguments
    ):
        return
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [a for a in arguments if not a.startswith("-")]
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(lines)
        fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            composed = compose(config_name, overrides=fixed, return_hydra_config=True)
            sweeper = composed.hydra.sweeper
            if not is_basic_sweeper(str(sweeper.get("_target_", ""))):
                swept = [
                    *(sweeper.get("params") or {}),
                    *(o.key_or_group for o in overrides if o.is_sweep_override()),
                ]
                check_optimized_metric(composed, str(sweeper.get("_target_")), swept)
                return
            params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
            # the basic sweeper's own expansion (params first, as its sweep() puts them): Hydra has no public
            # call that lists a sweep's jobs without launching them
            (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides([*params, *lines]), None)
            configs = [compose(config_name, overrides=job) for job in jobs]
    except HydraException:
        return  # Hydra names its own errors when it parses the sweep
    bad = []
    for number, (job, cfg) in enumerate(zip(jobs, configs, strict=True)):
        try:
            check_added_keys(cfg, config_name, job)
            check(cfg)
        except USER_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            bad.append(f"job {number} ({' '.join(job)}): {message}")
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"{len(bad)} of the sweep's {len(jobs)} jobs would fail (checked before any starts): "
            + "; ".join(bad[:3])
            + more
        )


# Where a sweep changes one of these, what a trial validates with is not the composed config's to say.
_VALIDATION_ROOTS = ("optimized_metric", "data", "algorithm", "trainer", "task", "callbacks")
_UNSETTLED = object()


def check_optimized_metric(cfg: DictConfig, sweeper: str, swept: Sequence[str]) -> None:
    """Refuse, before the first trial, a validation metric (`optimized_metric=val/...`) in a search whose runs
    never validate: the sweeper (`sweeper`, which optimises what a job returns) found it missing only after
    the first trial had trained. Only what the composed config settles is refused. Nothing is checked where a
    swept key may change it (a key under `_VALIDATION_ROOTS`, or a config group's choice, which may set
    anything), where the deciding value is an interpolation (it may follow a swept key), or where a class not
    vrft's (the algorithm, a callback) may log a `val/...` of its own. Other names (a misspelt `train/...`, a
    task's per-class metric) hang on the algorithm's code and on the data: the run names them after the
    first trial (`vrft.train.optimized_value`)."""
    name = cfg.get("optimized_metric")
    if not isinstance(name, str) or not name.startswith("val/"):
        return
    for key in (key.lstrip("+~") for key in swept):
        if key.split(".")[0] in _VALIDATION_ROOTS or ("." not in key and (config_dir() / key).is_dir()):
            return
    callbacks = [node for node in (cfg.get("callbacks") or {}).values() if isinstance(node, DictConfig)]
    targets = [OmegaConf.select(cfg, "algorithm._target_"), *(node.get("_target_") for node in callbacks)]
    if not all(str(target).startswith("vrft.") for target in targets):
        return
    if _settled(cfg, "data.val_split") is None:
        why = "data.val_split=null: no validation split"
    elif _settled(cfg, "algorithm.evaluator") is None:
        why = "algorithm.evaluator=null: no metric to validate with"
    elif _settled(cfg, "trainer.limit_val_batches") == 0:
        why = "trainer.limit_val_batches=0"
    else:
        return
    raise ValueError(
        f"optimized_metric={name!r} is a validation metric, and the search's runs never validate ({why}), so "
        f"the sweeper ({sweeper}) would have no value to optimise once the first trial had trained; validate "
        "with data.val_split=<a split> (and trainer.val_check_interval), or optimise a training metric: "
        "train/loss (every algorithm), train/reward (GRPO)"
    )


def _settled(cfg: DictConfig, key: str):
    """The value at dotted `key` as the config writes it; `_UNSETTLED` where it is absent or interpolated."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_interpolation(node, leaf):
        return _UNSETTLED
    return node[leaf]


def is_basic_sweeper(target: str) -> bool:
    """Whether a `hydra.sweeper._target_` is Hydra's basic sweeper (the grid of `-m`, which ignores what a job
    returns), decided by the class the name resolves to, not by its ending: `hydra_plugins.mine.BasicSweeper`
    is another sweeper, whose jobs `check_sweep` cannot list and which may optimise what a job returns. A
    target that does not resolve (a plugin not installed) is not the basic sweeper; Hydra names it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import _locate

    try:
        return _locate(target) is BasicSweeper
    except (ImportError, ValueError):  # ValueError: not a dotted name (an empty part)
        return False


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps errors raised inside instantiated constructors)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def user_errors(main: Callable) -> Callable:
    """Turn input errors into `vrft: error: ...` and exit code 2, and failures inside training
    (`TrainingFailure`: phase, step, safe checkpoint) into `vrft: internal failure: ...` and exit code 1;
    a SIGTERM into `vrft: stopped by SIGTERM` and exit code 143, Ctrl-C into `vrft: stopped by Ctrl-C` and
    exit code 130 (the first one stops training after its running step: `vrft.runtime.interrupt`), each
    naming the checkpoint to resume from; `VRFT_TRACEBACK=1` shows the traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with keyboard_stops() as stop:
            try:
                return main(*args, **kwargs)
            except SIGTERMException:
                # Lightning stops after the running step or batch by raising SystemExit without a code: exit
                # 0, which a job chain or scheduler would read as a finished run.
                cause = "Ctrl-C" if stop.ctrl_c else "SIGTERM"
                print(f"vrft: stopped by {cause}; {stopped_with(stop)}", file=sys.stderr)
                sys.exit(128 + (signal.SIGINT if stop.ctrl_c else signal.SIGTERM))
            except (KeyboardInterrupt, SystemExit):
                # A second Ctrl-C, or one outside a fit: Python's KeyboardInterrupt, which Lightning turns
                # into sys.exit(1) inside a fit; a SystemExit with no Ctrl-C pressed is someone else's.
                if not stop.ctrl_c:
                    raise
                print(
                    f"vrft: stopped by Ctrl-C at once; the running step or batch is lost; {stopped_with(stop)}",
                    file=sys.stderr,
                )
                sys.exit(128 + signal.SIGINT)
            except TrainingFailure as failure:
                if os.environ.get("VRFT_TRACEBACK"):
                    raise
                print(f"vrft: internal failure: {failure}", file=sys.stderr)
                print(
                    "(set VRFT_TRACEBACK=1 to see the traceback, and include it in a bug report)",
                    file=sys.stderr,
                )
                sys.exit(1)
            except (InstantiationException, *USER_ERRORS) as error:
                if os.environ.get("VRFT_TRACEBACK"):
                    raise
                cause = root_cause(error)
                if isinstance(error, InstantiationException) and not isinstance(cause, USER_ERRORS):
                    raise
                message = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
                print(f"vrft: error: {message}", file=sys.stderr)
                print("(set VRFT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
                sys.exit(2)

    return wrapper


def stopped_with(stop: StopRecord) -> str:
    """What a stopped command kept and how to go on from it (the CLI's last line)."""
    if stop.saved is not None:
        step, path = stop.saved
        return f"training checkpointed step {step}: resume with ckpt_path={path}"
    return (
        "no checkpoint was written at the stop (no step had finished since the last one): a run resumes "
        "from its last checkpoint, if it kept one, with ckpt_path=<run>/checkpoints/last.ckpt; an evaluation "
        "kept the predictions.jsonl written so far: evaluate again with resume=<its folder>"
    )


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config, identical for identical runs (run dir excluded)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("run_dir", "ckpt_path"):
        resolved.pop(key, None)
    return cache_key(OmegaConf.to_yaml(OmegaConf.create(resolved)))
