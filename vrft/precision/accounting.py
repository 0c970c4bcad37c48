"""Counting what a (possibly quantised) model holds: layer types, weight bytes, logical parameter counts.

Works without importing bitsandbytes: its classes are recognised by their module, so that the fp32 / bf16 /
fp16 plugins do not depend on it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor


def bitsandbytes_class(obj: object) -> type | None:
    """The bitsandbytes class `obj` is an instance of, or derives from (vrft's `FrozenInt8Linear` is a
    `Linear8bitLt`); None for anything else."""
    return next((cls for cls in type(obj).__mro__ if cls.__module__.startswith("bitsandbytes")), None)


def is_quantized_param(param: Tensor) -> bool:
    """True for bitsandbytes weight parameters (`Params4bit`, `Int8Params`), quantised yet or not."""
    return isinstance(param, torch.nn.Parameter) and bitsandbytes_class(param) is not None


def quantized_layer_counts(module: torch.nn.Module) -> dict[str, int]:
    """Number of bitsandbytes linear layers by bitsandbytes class name, e.g. `{"Linear4bit": 196}`."""
    classes = (bitsandbytes_class(m) for m in module.modules() if isinstance(m, torch.nn.Linear))
    counts = Counter(cls.__name__ for cls in classes if cls is not None)
    return dict(sorted(counts.items()))


def _quantization_statistics(module: torch.nn.Module) -> Iterator[Tensor]:
    # Tensors bitsandbytes keeps outside parameters and buffers: 4-bit block absmax (and, with double
    # quantisation, its own absmax and code) in the weight's quant_state; int8 row scales (SCB).
    for m in module.modules():
        # Own parameters only: peft's LoRA wrappers expose their base layer's weight as `.weight` too.
        weight = dict(m.named_parameters(recurse=False)).get("weight")
        state = getattr(weight, "quant_state", None)
        if state is not None:
            yield from (t for t in (state.absmax, state.code, state.offset) if isinstance(t, Tensor))
            nested = getattr(state, "state2", None)
            if nested is not None:
                yield from (t for t in (nested.absmax, nested.code) if isinstance(t, Tensor))
        for owner in (weight, getattr(m, "state", None)):
            scb = getattr(owner, "SCB", None)
            if isinstance(scb, Tensor):
                yield scb


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters, buffers and quantisation statistics, each storage counted once.

    Packed 4-bit weights are uint8 tensors of half the element count, so `numel * element_size` is already
    their true size; tied weights (embedding and lm_head) share one storage.
    """
    seen: set[tuple[torch.device, int, int]] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers(), *_quantization_statistics(module)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        # By address, not storage: loaded weights may be views into one shared (memory-mapped) storage.
        key = (tensor.device, tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def logical_numel(param: Tensor) -> int:
    """Elements of the weight a parameter stands for (a packed 4-bit weight stores two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(param, "bnb_quantized", False):
        return math.prod(state.shape)
    return param.numel()


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameters, tied weights once, quantised weights at their unpacked size."""
    trainable = total = 0
    for param in module.parameters():
        count = logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
