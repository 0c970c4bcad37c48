"""The planner on a Hydra config: footprint of the model as the precision plugin stores it, the workload,
the budget of the hardware profile, the verdict, and the change that makes a config fit.

The model's footprint comes from `vrft.planner.footprint` (the precision plugin's own conversion, on the
meta device); the workload from the `algorithm` and `model` settings.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vrft.distributed import (
    SHARDING,
    check_optimizer,
    check_strategy,
    optimizer_refusal,
    strategy_name,
    world_size,
)
from vrft.kernels.nf4_matmul import mma_unavailable
from vrft.models.policy import ModelSpec
from vrft.modules.settings import GRPOSettings
from vrft.paths import config_dir
from vrft.planner.auto import AUTO_ORDER, AutoPrecision
from vrft.planner.estimator import (
    Calibration,
    MemoryPlan,
    ModelShape,
    Workload,
    estimate,
)
from vrft.planner.footprint import model_config, model_shape, weight_footprint
from vrft.rollout.engines import check_rollout_engine
from vrft.rollout.packed import PACKED_FIX, packed_unavailable
from vrft.runtime.cuda import device_total_gb

log = logging.getLogger(__name__)

CONF_DIR = config_dir()
PIXELS_PER_TOKEN = 28 * 28  # one merged visual token covers 2 x 2 patches of 14 x 14 pixels
PROMPT_TEXT_TOKENS = 128  # chat template + a Visual-RFT question (the detection prompt is the longest)
# Fastest first, as measured (bench/rollout/results.md, first two sections): with nf4_mma's kernel on its
# decode batches `packed` decoded 16 sequences of 7B int4 in 5.4 ms against `bf16_copy`'s 7.2 on an H100 and
# in 5.5 against 5.8 on an H200, and its training step was the faster on both, without the 13 GB copy; with
# nf4_matmul's kernel alone (VRFT_NF4_MMA=0, a Triton without Gluon, batches over 32 sequences) it is the
# slower one.
AUTO_ENGINES = ("packed", "bf16_copy", "dequant")
AUTO_ENGINES_WITHOUT_MMA = ("bf16_copy", "packed", "dequant")


def precision_name(precision_cfg) -> str:
    """The mode name (`int4`, `bf16`, `auto`, ...) of a precision config, from its class's `name`."""
    from hydra.utils import get_class

    target = (precision_cfg or {}).get("_target_")
    return str(getattr(get_class(target), "name", target)) if target else ""


def settings_of(cls: type, node: DictConfig):
    """The validated settings dataclass `cls` that the module builds from the config `node` (the planner
    plans exactly what will run, and a bad value fails here with the module's own message)."""
    names = {f.name for f in fields(cls)}
    values = OmegaConf.to_container(node, resolve=True)
    return cls(**{key: value for key, value in values.items() if key in names})


def workload(cfg: DictConfig, shape: ModelShape, activation_bytes: int) -> Workload:
    """The GRPO workload of `cfg` (image tokens from `model.max_pixels` unless `plan.image_tokens` is set)."""
    settings, plan = settings_of(GRPOSettings, cfg.algorithm), cfg.get("plan") or {}
    model = settings_of(ModelSpec, cfg.model)
    ranks = world_size(cfg) if cfg.get("trainer") else 1
    image_tokens = plan.get("image_tokens") or model.max_pixels // PIXELS_PER_TOKEN
    return Workload(
        group_size=settings.group_size,
        rollout_batch_size=settings.rollout_batch_size,
        update_micro_batch_size=settings.update_micro_batch_size,
        max_new_tokens=settings.max_new_tokens,
        logprob_chunk_size=settings.logprob_chunk_size,
        image_tokens=int(image_tokens),
        prompt_text_tokens=int(plan.get("prompt_text_tokens") or PROMPT_TEXT_TOKENS),
        rollouts_per_step=max(settings.rollouts_per_step // ranks, 1),
        gradient_checkpointing=model.gradient_checkpointing,
        reference=float(cfg.loss.get("beta", 0.0)) > 0,
        rollout_engine=settings.rollout_engine,
        activation_bytes=activation_bytes,
        ranks=ranks,
        shard_weights=ranks > 1 and strategy_name(cfg.trainer).startswith(SHARDING),
    )


def plan_config(cfg: DictConfig, calibration: Calibration | None = None) -> MemoryPlan:
    """Predict the peak memory of training `cfg` (resolves `auto` settings first)."""
    cfg = resolve_auto(cfg, quiet=True)
    shape = model_shape(model_config(str(cfg.model.name_or_path)))
    footprint, activation_bytes = weight_footprint(cfg)
    return estimate(shape, footprint, workload(cfg, shape, activation_bytes), calibration or Calibration())


# ------------------------------------------------------------------------------------------ budget
def budget_gb(cfg: DictConfig) -> tuple[float | None, str]:
    """The memory budget (GiB) and where it comes from: hw profile, memory cap, or the CUDA device."""
    hw = cfg.get("hw") or {}
    for key, value in (("hw.memory_gb", hw.get("memory_gb")), ("memory_cap_gb", cfg.get("memory_cap_gb"))):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise ValueError(
                f"{key}={value!r} is not a memory budget; pass GiB as a number > 0 (e.g. {key}=24), or null for "
                "the CUDA device's own memory"
            )
    if hw.get("memory_gb"):
        return float(hw.memory_gb), f"hw={hw.get('name', '?')}"
    if cfg.get("memory_cap_gb"):
        return float(cfg.memory_cap_gb), "memory_cap_gb"
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    total = device_total_gb() if accelerator in ("auto", "gpu", "cuda") else None
    if total:
        return total, "this CUDA device"
    name = hw.get("name")
    profile = f"hw={name} sets no memory_gb" if name not in (None, "none") else "no hw profile"
    return None, f"{profile} and no CUDA device"


@dataclass
class Verdict:
    """A plan against a budget, with the change that makes it fit when it does not."""

    plan: MemoryPlan
    budget_gb: float | None
    budget_source: str
    suggestion: list[str]

    @property
    def fits(self) -> bool:
        return self.budget_gb is None or self.plan.device_gb <= self.budget_gb


def _with(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A copy of `cfg` with `key=value` overrides; `precision=` / `optimizer=` load that config file."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for override in overrides:
            key, value = override.split("=", 1)
            if key in ("precision", "optimizer"):
                cfg[key] = OmegaConf.load(CONF_DIR / key / f"{value}.yaml")
            else:
                # Parsed as YAML, as Hydra parses a command line: `8` is an int, `true` a bool.
                OmegaConf.update(cfg, key, OmegaConf.create(f"v: {value}").v, merge=False)
    return cfg


# The next precision down in memory, for the planner's suggestions.
LOWER_PRECISION = {"fp32": "bf16", "fp16": "int8", "bf16": "int8", "int8": "mixed", "mixed": "int4"}


def _runs(cfg: DictConfig, change: str) -> bool:
    """Whether the run's strategy takes `cfg` with `change` (a suggestion must be a run vrft starts)."""
    if not cfg.get("trainer"):
        return True
    trial = _with(cfg, [change])
    try:
        check_strategy(trial.trainer, trial.precision)
        check_optimizer(trial)
    except ValueError:
        return False
    return True


def _candidates(cfg: DictConfig) -> list[str]:
    """Single changes that shrink memory, least harmful to training first."""
    algorithm, changes = cfg.algorithm, []
    if algorithm.get("rollout_engine", "hf") == "bf16_copy":
        changes.append("algorithm.rollout_engine=dequant")
    if int(algorithm.logprob_chunk_size) > 256:
        changes.append("algorithm.logprob_chunk_size=256")
    if not cfg.model.gradient_checkpointing:
        changes.append("model.gradient_checkpointing=true")
    micro = int(algorithm.update_micro_batch_size)
    if micro > 1:
        changes.append(f"algorithm.update_micro_batch_size={micro // 2 if micro % 2 == 0 else 1}")
    if "Paged" not in str((cfg.get("optimizer") or {}).get("_target_", "")) and _runs(
        cfg, "optimizer=paged_adamw8bit"
    ):
        changes.append("optimizer=paged_adamw8bit")
    name = precision_name(cfg.precision)
    while name := LOWER_PRECISION.get(name):  # the next smaller one the strategy runs (fsdp: bf16 -> int4)
        if (CONF_DIR / "precision" / f"{name}.yaml").exists() and _runs(cfg, f"precision={name}"):
            changes.append(f"precision={name}")
            break
    if int(algorithm.rollout_batch_size) > 1:
        changes.append("algorithm.rollout_batch_size=1")
    if int(cfg.model.max_pixels) > 200704:
        changes.append(f"model.max_pixels={int(cfg.model.max_pixels) // 2}")
    if int(algorithm.group_size) > 4:
        changes.append(f"algorithm.group_size={int(algorithm.group_size) // 2}")
    return changes


def verdict(cfg: DictConfig, calibration: Calibration | None = None, max_changes: int = 6) -> Verdict:
    """Plan `cfg` against its budget; when it does not fit, find the smallest change set (greedy) that does."""
    cfg = resolve_auto(cfg, quiet=True)
    plan = plan_config(cfg, calibration)
    budget, source = budget_gb(cfg)
    result = Verdict(plan, budget, source, [])
    if result.fits:
        return result
    applied: list[str] = []
    current = cfg
    for _ in range(max_changes):
        planned = {}  # each candidate's device GiB, least harmful first; none for a run vrft would refuse
        for change in _candidates(current):
            gb = _planned_gb(_with(current, [change]), calibration)
            if gb is not None:
                planned[change] = gb
        for change, gb in planned.items():  # a single change that is enough
            if gb <= budget:
                result.suggestion = _merged([*applied, change])
                return result
        if not planned:
            break
        first = next(iter(planned))  # otherwise take the least harmful and look again
        applied.append(first)
        current = _with(current, [first])
    return result  # none is enough: no suggestion (report.py says so), not changes that still do not fit


def _planned_gb(cfg: DictConfig, calibration: Calibration | None) -> float | None:
    """The plan's device GiB, or None where the settings break one of the run's own rules (a candidate such
    as `rollout_batch_size=1` whose sequences the micro-batch no longer divides): never suggested."""
    try:
        return plan_config(cfg, calibration).device_gb
    except ValueError:
        return None


def _merged(changes: list[str]) -> list[str]:
    """The changes with each key once, at its last value (the greedy search may halve a key twice)."""
    last = {change.split("=", 1)[0]: change for change in changes}
    return list(last.values())


def resolve_precision(cfg: DictConfig, quiet: bool = False) -> DictConfig:
    """Replace `precision=auto` by the most precise mode (bf16, int8, mixed, int4) the planner says fits."""
    precision = cfg.get("precision") or {}
    if precision_name(precision) != AutoPrecision.name:
        return cfg
    order = list(precision.get("candidates") or AUTO_ORDER)
    budget, source = budget_gb(cfg)
    chosen, reasons = order[-1], []
    for name in order:
        plan = plan_config(_with(cfg, [f"precision={name}"]))
        reasons.append(f"{name}: {plan.device_gb:.1f} GiB")
        if budget is None or plan.device_gb <= budget:
            chosen = name
            break
    if not quiet:
        budget_text = f"{budget:.1f} GiB ({source})" if budget else source
        log.info("precision=auto picked %s for a budget of %s [%s]", chosen, budget_text, ", ".join(reasons))
    resolved = copy.deepcopy(cfg)
    with open_dict(resolved):
        resolved.precision = OmegaConf.load(CONF_DIR / "precision" / f"{chosen}.yaml")
    return resolved


def resolve_rollout_engine(cfg: DictConfig, quiet: bool = False) -> DictConfig:
    """Replace `algorithm.rollout_engine=auto` by the fastest engine that fits and can run here.

    In `AUTO_ENGINES` order: `packed` where Triton, the GPU and the 4-bit layout allow it, `bf16_copy` where
    the planner says its copy fits, else `dequant`; `bf16_copy` comes first where nf4_mma's kernel would not
    serve `packed`'s decode batches (`mma_unavailable`: switched off, no Gluon, or batches over 32
    sequences). Without CUDA the static engines have no graphs to replay, so `auto` means `hf` there. An
    explicit `packed` that cannot run fails here, before loading.
    """
    engine = OmegaConf.select(cfg, "algorithm.rollout_engine")
    if engine is not None:  # (algorithm=sft samples nothing)
        check_rollout_engine(engine)  # a misspelt engine fails here, not after a warm start or the load
    packed_reason = None
    if engine in ("auto", "packed"):
        packed_reason = packed_unavailable(precision_name(cfg.precision), cfg.precision)
    if engine == "packed" and packed_reason:
        raise ValueError(f"algorithm.rollout_engine=packed cannot run here: {packed_reason}; {PACKED_FIX}")
    if engine != "auto":
        return cfg
    budget, source = budget_gb(cfg)
    if strategy_name(cfg.trainer) == "fsdp":
        chosen, why = "hf", "trainer.strategy=fsdp (the static engines need the whole model on one device)"
    elif budget is None and not torch.cuda.is_available():
        chosen, why = "hf", "no CUDA device"
    else:
        plan = plan_config(_with(cfg, ["algorithm.rollout_engine=bf16_copy"]))
        fits = budget is None or plan.device_gb <= budget
        reasons = {
            "bf16_copy": None
            if fits
            else f"its copy needs {plan.device_gb:.1f} GiB of {budget:.1f} GiB ({source})",
            "packed": packed_reason,
            "dequant": None,
        }
        # a rollout decodes rollout_batch_size x G sequences at a time: wider than nf4_mma's kernel takes,
        # packed's matmuls go to nf4_matmul's, slower than the bf16 copy (bench/rollout/results.md)
        algorithm = cfg.algorithm
        slow_packed = mma_unavailable(algorithm.group_size * algorithm.get("rollout_batch_size", 1))
        order = AUTO_ENGINES_WITHOUT_MMA if slow_packed else AUTO_ENGINES
        chosen = next(name for name in order if reasons[name] is None)
        skipped = [f"not {name}: {reasons[name]}" for name in order[: order.index(chosen)]]
        if chosen == "packed":
            skipped.append("nf4_mma's kernel decodes as fast as the bf16 copy without the copy")
        elif chosen == "bf16_copy" and slow_packed and reasons["packed"] is None:
            skipped.append(f"packed is slower without nf4_mma's kernel: {slow_packed}")
        why = "; ".join(skipped) or (f"it fits {budget:.1f} GiB ({source})" if budget else source)
    if not quiet:
        log.info("algorithm.rollout_engine=auto picked %s (%s)", chosen, why)
    return _with(cfg, [f"algorithm.rollout_engine={chosen}"])


def resolve_auto(cfg: DictConfig, quiet: bool = False) -> DictConfig:
    """Resolve `precision=auto`, then `algorithm.rollout_engine=auto`, with the planner."""
    return resolve_rollout_engine(resolve_precision(cfg, quiet), quiet)


def cards_needed(cfg: DictConfig, card_gb: float = 24.0, max_cards: int = 16) -> dict[str, int | None]:
    """The fewest cards of `card_gb` GiB the run of `cfg` needs per strategy (`ddp`, `fsdp`); None: more
    than `max_cards`, or never (DDP holds the whole model on every rank, so more cards barely help)."""
    needed: dict[str, int | None] = {}
    # FSDP refuses 8-bit optimizer state; its count is that of the fix the refusal names.
    fsdp_optimizer = ["optimizer=adamw"] if optimizer_refusal(cfg.get("optimizer")) else []
    for strategy in ("ddp", "fsdp"):
        needed[strategy] = None
        for cards in range(1, max_cards + 1):
            prompts = cfg.algorithm.get("prompts_per_step", 1) or 1
            if cards > 1 and prompts % (cards * cfg.algorithm.get("rollout_batch_size", 1)):
                continue  # the step's prompts must split evenly over the ranks
            overrides = [f"trainer.devices={cards}", f"trainer.strategy={strategy}", "trainer.num_nodes=1"]
            if strategy == "fsdp":
                overrides += ["algorithm.rollout_engine=hf", *fsdp_optimizer]  # hf: the only engine FSDP runs
            trial = _with(cfg, overrides)
            if plan_config(trial).device_gb <= card_gb:
                needed[strategy] = cards
                break
    return needed
