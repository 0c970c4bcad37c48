"""Checks of a multi-process run's settings, made before any model loads.

The processes themselves are Lightning's: `trainer.devices`, `trainer.num_nodes` and `trainer.strategy` pick
them, and Lightning's launcher, torchrun or SLURM start them. What Lightning cannot know is what vrft needs
of them: a GRPO step's prompts split evenly over the ranks (a group of G completions never crosses ranks),
and a strategy that can hold the precision plugin's weights. Each failure is one line naming the setting and
the fix, raised before the minutes a model takes to load.
"""

from __future__ import annotations

import os
import warnings

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from vrft.precision.fsdp import fsdp_precision_config

# Strategies that replicate the whole model on every rank (what vrft supports on every precision).
REPLICATING = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook")
# Strategies that shard parameters: they flatten weights, which bitsandbytes' packed codes survive only when
# stored in a float dtype. vrft runs `fsdp` for the plugins with an FSDP form (fp32, bf16, int4:
# vrft.precision.fsdp, vrft.runtime.sharding); the others are refused.
SHARDING = ("fsdp", "deepspeed")


def strategy_name(trainer_cfg: DictConfig) -> str:
    """The strategy's name (`ddp`, `fsdp`, `deepspeed_stage_2`, ...) of a `trainer` config node."""
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str):
        return strategy
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else type(strategy).__name__
    return target.rsplit(".", 1)[-1].lower().removesuffix("strategy") or "auto"


def uses_gpus(trainer_cfg: DictConfig) -> bool:
    """Whether the run's processes use CUDA devices (`accelerator` gpu/cuda, or auto with CUDA present)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def devices_per_node(trainer_cfg: DictConfig) -> int:
    """Processes per node that `trainer.devices` asks for (`-1`/`auto` on GPUs: every visible GPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        return max(torch.cuda.device_count(), 1) if uses_gpus(trainer_cfg) else 1
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str):  # "0,1": device indices
        return len([index for index in devices.split(",") if index.strip()])
    return len(devices)  # a list of device indices


def world_size(cfg: DictConfig) -> int:
    """Ranks of the run: processes per node times `trainer.num_nodes`."""
    return devices_per_node(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1) or 1)


def check_devices(trainer_cfg: DictConfig) -> None:
    """`trainer.devices` must not ask for more GPUs than this node shows."""
    devices = trainer_cfg.get("devices", 1)
    if not uses_gpus(trainer_cfg) or devices in (-1, "auto", "-1"):
        return
    wanted, visible = devices_per_node(trainer_cfg), torch.cuda.device_count()
    if wanted > visible == 0:
        raise ValueError(
            f"trainer.devices={devices} asks for {wanted} GPUs but none is visible; run on a machine with GPUs, "
            "or set trainer.accelerator=cpu (processes on the CPU, gloo backend)"
        )
    if wanted > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise ValueError(
            f"trainer.devices={devices} asks for {wanted} GPUs but {visible} are visible{note}; set "
            f"trainer.devices={visible} or fewer (trainer.devices=-1 takes every visible GPU)"
        )


def check_strategy(trainer_cfg: DictConfig, precision_cfg: DictConfig) -> None:
    """The strategy must be able to hold the precision plugin's weights."""
    name = strategy_name(trainer_cfg)
    target = (precision_cfg or {}).get("_target_")
    plugin = get_class(target) if target else None
    mode = getattr(plugin, "name", target)
    if name == "fsdp":
        # precision=auto is checked again once the planner has replaced it (vrft.train.fit).
        if target and mode != "auto":
            fsdp_precision_config(precision_cfg)  # raises, naming the precision and the fix
        return
    if name.startswith(SHARDING) and getattr(plugin, "quantized_base", False):
        raise ValueError(
            f"trainer.strategy={name} with precision={mode}: sharding a bitsandbytes-quantised base is not "
            "supported yet (FSDP/DeepSpeed would flatten its packed weights); use trainer.strategy=ddp, which "
            "keeps the quantised base whole on every rank, or a floating-point precision (precision=bf16)"
        )
    if name.startswith(SHARDING):
        raise ValueError(
            f"trainer.strategy={name} is not one vrft runs; use trainer.strategy=fsdp (Lightning's FSDP, one "
            "unit per transformer block) or trainer.strategy=ddp, which keeps the whole model on every rank"
        )
    if name not in REPLICATING:
        raise ValueError(
            f"trainer.strategy={name} is not one vrft runs; use trainer.strategy=ddp (or auto on one device)"
        )


def optimizer_refusal(optimizer_cfg: DictConfig | None) -> str | None:
    """Why the optimizer of `optimizer_cfg` cannot run under FSDP (`optimizer` config node), or None.

    FSDP hands the optimizer each rank's slice of the flattened parameters and, for a checkpoint, gathers
    each state tensor by its parameter's layout: it needs every state shaped like its parameter (or a
    scalar). The optimizer, as configured, takes one step on a probe parameter and says. bitsandbytes'
    8-bit optimizers fail it: uint8 codes plus blockwise statistics (an absmax per 256 values, a code map)
    that FSDP's gather cannot read (measured: an error at the first checkpoint), with blocks cut along each
    rank's slice rather than the parameter.
    """
    if not optimizer_cfg or not optimizer_cfg.get("_target_"):
        return None
    # Large enough that bitsandbytes keeps 8-bit state for it (it keeps fp32 state under min_8bit_size).
    probe = torch.nn.Parameter(torch.zeros(max(2**16, int(optimizer_cfg.get("min_8bit_size", 0)))))
    probe.grad = torch.ones_like(probe)
    try:
        with warnings.catch_warnings():  # a paged optimizer warns that it pages nothing on the CPU
            warnings.simplefilter("ignore")
            optimizer = instantiate(optimizer_cfg)([probe])
            optimizer.step()
    except Exception:  # an optimizer that cannot step here says nothing; the run reports its own error
        return None
    state = optimizer.state[probe]
    odd = sorted(
        key
        for key, value in state.items()
        if torch.is_tensor(value) and value.dim() > 0 and value.shape != probe.shape
    )
    if not odd:
        return None
    return (
        f"its state {odd} is not shaped like the parameters (bitsandbytes' 8-bit blockwise statistics), which "
        "FSDP can neither gather into a checkpoint nor split like the parameters; use optimizer=adamw (torch "
        "AdamW: 8 bytes per LoRA weight, split over the ranks) or trainer.strategy=ddp"
    )


def check_optimizer(cfg: DictConfig) -> None:
    """Under FSDP, the optimizer's state must be shaped like its parameters (`optimizer_refusal`)."""
    if strategy_name(cfg.trainer) != "fsdp":
        return
    reason = optimizer_refusal(cfg.get("optimizer"))
    if reason:
        raise ValueError(f"trainer.strategy=fsdp with optimizer._target_={cfg.optimizer._target_}: {reason}")


def check_rollout_engine(cfg: DictConfig) -> None:
    """Under FSDP the rollout runs `generate` on the sharded model: only the `hf` engine can."""
    engine = OmegaConf.select(cfg, "algorithm.rollout_engine")
    if strategy_name(cfg.trainer) == "fsdp" and engine not in (None, "hf", "auto"):
        raise ValueError(
            f"algorithm.rollout_engine={engine} cannot run under trainer.strategy=fsdp (its static cache, CUDA "
            "graph and weight copy need the whole language model on one device); set algorithm.rollout_engine=hf "
            "(or auto, which picks hf under FSDP)"
        )


def check_prompt_split(algorithm_cfg: DictConfig, ranks: int) -> None:
    """GRPO's prompts per step split evenly over the ranks, in whole rollout batches."""
    prompts, batch = algorithm_cfg.get("prompts_per_step"), algorithm_cfg.get("rollout_batch_size")
    if prompts is None or batch is None or ranks == 1:
        return
    if prompts % (ranks * batch):
        fitting = max(1, prompts // (ranks * batch)) * ranks * batch
        raise ValueError(
            f"algorithm.prompts_per_step={prompts} does not split over {ranks} ranks in rollout batches of "
            f"algorithm.rollout_batch_size={batch}; make it a multiple of {ranks * batch} (e.g. "
            f"algorithm.prompts_per_step={fitting}) or change trainer.devices"
        )


def check_plan_settings(cfg: DictConfig) -> int:
    """Check what a plan on paper needs: the prompt split (not this machine's GPUs, and any strategy, so
    that FSDP can be planned before it runs); returns the world size."""
    ranks = world_size(cfg)
    check_prompt_split(cfg.algorithm, ranks)
    return ranks


def check_distributed(cfg: DictConfig) -> int:
    """Check the run's device, strategy and prompt-split settings before loading; returns the world size."""
    check_devices(cfg.trainer)
    check_strategy(cfg.trainer, cfg.precision)
    check_optimizer(cfg)
    check_rollout_engine(cfg)
    return check_plan_settings(cfg)
