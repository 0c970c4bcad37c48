"""The policy under Lightning's FSDP strategy: one FSDP unit per transformer block, forwards through the root.

FSDP (torch's `FullyShardedDataParallel`, as Lightning's `FSDPStrategy` builds it) gathers a unit's weights
only inside that unit's `forward`, and finishes a backward (moves each rank's reduced gradient shard into
`.grad`) only from a hook on the outputs of the *root* unit's forward. Lightning's default root is the whole
LightningModule, whose forward is `training_step`: a manual-optimization step backpropagates inside it, so
that hook would never fire. Here the root is the policy itself, and every vrft forward of it (generation,
the log-prob forward with its chunked `lm_head`) runs as the root's forward (`in_root_forward`), so a
backward starts after the root forward returned, as FSDP expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    OptimStateKeyType,
    StateDictType,
)
from typing_extensions import override

from vrft.models.sharded import clean_name, is_sharded
from vrft.precision.accounting import weight_bytes
from vrft.runtime.weight_sync import broadcast_unit

T = TypeVar("T")


def in_root_forward(policy: nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` run as the forward of the FSDP root `policy` (a plain call when `policy` is not sharded).

    Inside, the root's own weights (embeddings, `lm_head`, final norm) are gathered, and the units below
    gather theirs when called; a tensor that `fn` returns with grad carries FSDP's backward hooks. The
    wrapped module's `forward` is replaced for this one call, as Lightning's `_ForwardRedirection` does
    for `training_step`.
    """
    if not is_sharded(policy):
        return fn()
    inner = policy.module
    own = inner.__dict__.get("forward")  # an instance-level forward, if something set one

    def restore() -> None:
        if own is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = own

    def forward() -> T:
        restore()  # the real forward again, for any call `fn` makes
        return fn()

    inner.forward = forward
    try:
        return policy()
    finally:
        restore()


def reregister_unsharded_weights(policy: nn.Module) -> None:
    """After a backward, register again as parameters the frozen weights that FSDP left as plain tensors.

    On one rank FSDP keeps every unit whole (it falls back to NO_SHARD). A backward unflattens a unit's
    weights as plain tensors, and for a frozen unit only a hook on a gradient into its inputs registers
    them back: the root's forward has no input (`in_root_forward`), the first decoder layer's input (the
    frozen embedding's output) needs no gradient, and FSDP's catch-all at the end of the backward takes
    an unsharded flat parameter for a resharded one (torch 2.13; with several ranks the flat parameter is
    sharded and the catch-all reshards it). The next forward would adopt the tensors as new parameters: a
    tied one (the root's `lm_head`) then fails FSDP's check ("as_params=True type(prim_param)=Tensor"),
    untied ones drop out of `parameters()`. Resharding a NO_SHARD unit's handle registers its views into
    the same flat parameter again (no copy). FSDP has no public call for it.
    """
    if not is_sharded(policy):
        return
    for unit in FullyShardedDataParallel.fsdp_modules(policy):
        handle = getattr(unit, "_handle", None)
        if handle is not None and not handle.uses_sharded_strategy:
            handle._use_sharded_views()


def clip_grad_norm(policy: nn.Module, max_norm: float) -> float:
    """Clip the policy's gradients to `max_norm` (inf: measure only); returns their total norm, over all ranks.

    Under FSDP each rank holds a shard of each gradient, and `torch.nn.utils.clip_grad_norm_` would return
    the norm of this rank's shard; the root's `clip_grad_norm_` all-reduces the squares (a collective: every
    rank calls it).
    """
    if is_sharded(policy):
        return float(policy.clip_grad_norm_(max_norm))
    params = [p for p in policy.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0


def adapter_units(policy: nn.Module, names: set[str]) -> list[tuple[nn.Module, list[str]]]:
    """The FSDP units of the root `policy` whose every weight is one of `names` (as a checkpoint spells
    them, `policy.`-prefixed), each with its weights' names in `unit.parameters()` order.

    Each LoRA matrix is such a unit (`PolicyFSDPStrategy._unit_rule`): gathering it alone
    (`summon_full_params(unit, recurse=False)`) reads or writes the adapter without gathering the base.
    """
    # FSDP makes the first unit it initialises a root; before any forward that must be the policy's, or
    # the adapter units gathered here would each become one.
    with FullyShardedDataParallel.summon_full_params(policy, recurse=False, writeback=False):
        pass
    units = []
    for prefix, unit in policy.named_modules(prefix="policy"):
        if is_sharded(unit):
            own = [clean_name(f"{prefix}.{name}") for name, _ in unit.named_parameters()]
            if own and all(name in names for name in own):
                units.append((unit, own))
    return units


def block_classes(policy: nn.Module) -> tuple[type[nn.Module], ...]:
    """The transformer block classes of a (peft-wrapped) transformers model: one FSDP unit each.

    `_no_split_modules` is transformers' own list of the blocks that must stay whole on one device (Qwen2-VL:
    its decoder layer and vision block), the list accelerate's FSDP wrapping reads too.
    """
    names = set()
    for module in policy.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(module) for module in policy.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(
            f"trainer.strategy=fsdp: the model declares no transformer blocks to shard by (_no_split_modules: "
            f"{sorted(names)}); vrft shards Qwen2-VL / Qwen2.5-VL checkpoints"
        )
    return tuple(sorted(classes, key=lambda cls: cls.__name__))


class PolicyFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with the LightningModule's `policy` as the FSDP root (module docstring).

    Each transformer block is a unit holding its frozen base weights, and each trainable LoRA matrix a unit
    inside it (`_unit_rule` says why), all with `use_orig_params=True`: the optimizer, the adapter export
    and the checkpoints see the original parameters and their names. Rank 0 alone loads the base; the other
    ranks receive its weights one unit at a time as the units are sharded (`vrft.runtime.weight_sync`).

    Checkpoints hold the trainable weights (`lightning_module_state_dict`), written by rank 0 in the format
    an unsharded run reads (so a run saved under FSDP resumes on any number of ranks). A full state dict
    (`lora.full`, the optimizer's moments) is gathered with `offload_to_cpu` on GPUs only: FSDP's offload
    copies the gathered weights to the CPU and frees the originals, and when the originals are on the CPU
    already the copy is the original (measured: a segfault in torch 2.13).
    """

    strategy_name = "vrft_fsdp"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        super().__init__(**kwargs)
        # This rank's weight bytes before sharding (`_setup_model`): the run summary's loaded_weight_bytes_by_rank.
        self.loaded_weight_bytes: int | None = None

    @property
    def loads_weights(self) -> bool:
        """Whether this rank reads the base model's weights from disk: rank 0 alone. The others build the
        model on the meta device and receive rank 0's weights unit by unit (`vrft.runtime.weight_sync`)."""
        return self.global_rank == 0

    def _unit_rule(self, policy: nn.Module) -> Callable[[nn.Module], bool]:
        blocks = block_classes(policy)

        def own_unit(module: nn.Module) -> bool:
            if isinstance(module, blocks):
                return True
            # A LoRA matrix: its own unit inside its block's. Sharing the block's flat parameter would give
            # the frozen weights a (zero) gradient of their size, reduce-scattered every step (FSDP warns of
            # it), and FSDP flattens one dtype per unit (a bf16 base with fp32 adapters could not share).
            own = list(module.parameters(recurse=False))
            return bool(own) and all(p.requires_grad for p in own)

        return own_unit

    def _shard(self, policy: nn.Module) -> FullyShardedDataParallel:
        """`policy` as the FSDP root, its units wrapped bottom-up as FSDP's auto-wrapping would (`_unit_rule`),
        each filled with rank 0's weights right before it is sharded (`broadcast_unit`)."""
        kwargs = {key: value for key, value in self.kwargs.items() if key != "auto_wrap_policy"}
        kwargs.update(
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # A torch.device, not Lightning's `.index`: on the CPU the index is None, which FSDP reads as "the
            # current CUDA device".
            device_id=self.root_device,
        )
        own_unit, wrapped = self._unit_rule(policy), set()

        def shard(module: nn.Module) -> FullyShardedDataParallel:
            if self.world_size > 1:
                broadcast_unit(module, self.root_device, self.precision_plugin)
            return FullyShardedDataParallel(module, **kwargs)

        def shard_below(module: nn.Module) -> None:
            for name, child in list(module.named_children()):
                if id(child) in wrapped:
                    continue
                wrapped.add(id(child))
                shard_below(child)  # nested units first: each FSDP unit flattens what is left to it
                if own_unit(child):
                    setattr(module, name, shard(child))

        shard_below(policy)
        return shard(policy)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not is_sharded(model.policy):
            # What this rank held before sharding: the whole base on rank 0, nothing elsewhere (the run summary
            # records it for each rank).
            self.loaded_weight_bytes = weight_bytes(model.policy)
            model.policy = self._shard(model.policy)
        # The LightningModule's `device` follows `.to()` calls, and FSDP moves the weights without one (each
        # unit's, onto `device_id`): set it as Lightning's Fabric does after its FSDP setup. Rollout inputs,
        # the seeded CUDA generator and the memory figures all go where `device` says.
        _update_properties(model, device=self.root_device)
        # Lightning's own setup (activation checkpointing, metrics) sees the FSDP units and wraps nothing more.
        return super()._setup_model(model)

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        reregister_unsharded_weights(self.lightning_module.policy)

    @contextlib.contextmanager
    @override
    def block_backward_sync(self) -> Iterator[None]:
        """FSDP's `no_sync` on the policy root (Lightning's blocks DDP only): micro-batches accumulate whole
        (unsharded) gradients, which for LoRA are a few MB per rank, and the last one reduce-scatters them."""
        policy = self.lightning_module.policy
        if not is_sharded(policy):
            yield
            return
        with policy.no_sync():
            yield

    @contextlib.contextmanager
    def _full_state_dict(self, rank0_only: bool = True) -> Iterator[None]:
        offload = self.root_device.type != "cpu"
        with FullyShardedDataParallel.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        ):
            yield

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's trainable weights, gathered on rank 0 one FSDP unit at a time (empty elsewhere).

        That is all a vrft checkpoint and adapter keep (`PolicyModule.on_save_checkpoint`). A full state
        dict would first materialise the whole frozen base on rank 0 (144 GB for a 72B base in bf16) to keep
        a few MB of it. Each adapter matrix is a unit of its own (`_unit_rule`). If some trainable weight
        is not (a fully trained model, `lora.full`), every weight is gathered as before.
        """
        keep = self.lightning_module.trainable_state_keys()
        units = adapter_units(self.lightning_module.policy, keep)
        if {name for _, names in units for name in names} != keep:
            with self._full_state_dict():
                return self.model.state_dict()
        state: dict[str, Any] = {}
        for unit, names in units:
            # Gathered on the device and copied to the CPU here: FSDP's `offload_to_cpu` is refused for a
            # unit that is not sharded (one rank: FSDP falls back to NO_SHARD), and an adapter matrix is a few
            # MB on the device.
            with FullyShardedDataParallel.summon_full_params(
                unit, recurse=False, writeback=False, rank0_only=True
            ):
                if self.global_rank == 0:
                    for name, param in zip(names, unit.parameters(), strict=True):
                        state[name] = param.detach().to("cpu", copy=True)
        return state

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's optimizer
        with self._full_state_dict():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                # Keyed by the index in the optimizer's parameters, as an unsharded run's state is (Lightning
                # passes no optimizer, and the index then counts the frozen parameters too).
                state = FullyShardedDataParallel.rekey_optim_state_dict(
                    state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer
                )
            return state

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a vrft checkpoint (a full file holding the adapter only) into the sharded policy and optimizer.

        FSDP's own full-state-dict load wants every weight of a unit in the file, the frozen base included;
        vrft's checkpoints hold the adapter alone. Each adapter matrix is a unit of its own (`_unit_rule`),
        so each is gathered, overwritten from the file and written back to its shards, one at a time.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        adapter = checkpoint["state_dict"]  # kept: the module checks its keys in on_load_checkpoint
        # Units of frozen weights (a block's base) are the model folder's, loaded already.
        for unit, names in adapter_units(self.lightning_module.policy, set(adapter)):
            with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True):
                with torch.no_grad():
                    for name, param in zip(names, unit.parameters(), strict=True):
                        param.copy_(adapter[name])
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            with self._full_state_dict(rank0_only=False):
                for optimizer, state in zip(self.optimizers, optimizer_states, strict=True):
                    # Keyed by index in the optimizer's parameters (as written by `optimizer_state`).
                    state = FullyShardedDataParallel.rekey_optim_state_dict(
                        state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer
                    )
                    optimizer.load_state_dict(
                        FullyShardedDataParallel.optim_state_dict_to_load(self.model, optimizer, state)
                    )
        return checkpoint
