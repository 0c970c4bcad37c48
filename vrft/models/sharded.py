"""What the model code needs to know of an FSDP-wrapped policy: whether it is one, what it wraps, and
parameter names as an unsharded run spells them. (The strategy itself is in `vrft.runtime.sharding`.)"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

# What FSDP puts in front of a wrapped module's parameter names; full state dicts are written without it.
FSDP_PREFIX = "_fsdp_wrapped_module."


def is_sharded(policy: nn.Module) -> bool:
    """Whether `policy` is an FSDP root (its weights sharded over the ranks)."""
    return isinstance(policy, FullyShardedDataParallel)


def unwrap(policy: nn.Module) -> nn.Module:
    """The peft / transformers model inside an FSDP root, or `policy` itself."""
    return policy.module if is_sharded(policy) else policy


def clean_name(name: str) -> str:
    """A parameter name as a full state dict (and an unsharded run) spells it."""
    return name.replace(FSDP_PREFIX, "")
