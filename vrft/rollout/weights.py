"""Linear layers of the training-time policy, re-expressed for the static decoder.

The policy's projections are peft LoRA layers around a base layer whose weight may be bf16, bnb 4-bit or
bnb 8-bit. The decoder needs one thing from each: `y = x W^T + b + scale * (x A^T) B^T`. Two ways to get it:

- `merged`: materialise `W + scale * B A` once per rollout as a dense bf16 matrix (2 bytes per parameter
  for the whole rollout; fastest decode, one matmul per projection).
- `packed`: keep the base weight as it is stored and dequantise it inside each decode step (one layer's
  bf16 matrix of scratch at a time), adding the LoRA term unmerged.

A layer whose forward is not that sum says what it multiplies by instead: quantisation-aware training
(`vrft.precision.qat`) computes with `fake_quantize(W + scale * B A)`, which its `effective_weight()` returns.

How each storage format turns back into a dense matrix is a registry keyed by module type, so the decoder
never asks "is this int4?".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# module type -> function returning its dense weight [out, in] (any float dtype) as a new tensor, which the
# bf16 copy may change in place (`linear_op` adds LoRA into it when it is already fp32)
DEQUANTIZERS: dict[type, Callable[[nn.Module], Tensor]] = {}


def _register_bitsandbytes() -> None:
    # The precision plugin's schemes know how their layers store weights (int8 rows move to `layer.state`
    # after the first forward); ask them rather than reading bitsandbytes internals here.
    try:
        from vrft.precision.schemes import Int4Scheme, Int8Scheme
    except ImportError:  # bitsandbytes is optional for the dense path
        return
    DEQUANTIZERS[Int4Scheme.layer_type] = Int4Scheme.dequantize
    DEQUANTIZERS[Int8Scheme.layer_type] = Int8Scheme.dequantize


def dense_weight(module: nn.Module) -> Tensor:
    """The `[out, in]` weight of a (possibly quantised) linear layer as a dense float tensor."""
    if not DEQUANTIZERS:  # lazily: importing bitsandbytes costs seconds, dense models never need it
        _register_bitsandbytes()
    for kind in type(module).__mro__:
        if kind in DEQUANTIZERS:
            return DEQUANTIZERS[kind](module)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight
    raise TypeError(
        f"cannot read the weight of a {type(module).__name__} for the static rollout engine; register a "
        "dequantizer in vrft.rollout.weights.DEQUANTIZERS or set algorithm.rollout_engine=hf"
    )


@dataclass
class LoraTerm:
    """One active LoRA adapter of a projection: adds `scale * (x A^T) B^T`."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float

    def __call__(self, x: Tensor) -> Tensor:
        # peft computes the adapter in its own dtype (fp32 LoRA stays fp32); mirror it.
        return F.linear(F.linear(x.to(self.a.dtype), self.a), self.b) * self.scale


class LinearOp:
    """`x [..., in] -> [..., out]` in the decoder's compute dtype."""

    out_features: int

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def silu_mul_with(self, up: LinearOp, x: Tensor) -> Tensor | None:
        """`silu(self(x)) * up(x)` where this op (a gate projection) computes it in one launch with `up`, or
        None: the decoder then calls both and its own SiLU."""
        return None


class DenseLinear(LinearOp):
    """A dense (possibly LoRA-merged) weight; the `merged` engine's layer."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias = weight, bias  # [out, in], [out]
        self.out_features = weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(LinearOp):
    """Base weight kept in its storage format, dequantised per call; LoRA applied unmerged."""

    def __init__(self, base: nn.Module, bias: Tensor | None, loras: list[LoraTerm], dtype: torch.dtype):
        self.base, self.bias, self.loras, self.dtype = base, bias, loras, dtype
        self.out_features = base.out_features

    def __call__(self, x: Tensor) -> Tensor:
        y = F.linear(x, dense_weight(self.base).to(self.dtype), self.bias)
        for lora in self.loras:
            y = y + lora(x).to(y.dtype)
        return y


class RebuiltLinear(LinearOp):
    """A layer that builds its dense weight anew from its adapter (QAT's rounded merge), on every call: the
    `dequant` engine's form of it, one matrix of scratch at a time."""

    def __init__(
        self, weight: Callable[[], Tensor], bias: Tensor | None, dtype: torch.dtype, out_features: int
    ):
        self.weight, self.bias, self.dtype = weight, bias, dtype
        self.out_features = out_features

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(self.dtype), self.bias)


def _split_lora(module: nn.Module) -> tuple[nn.Module, list[LoraTerm]]:
    """The base layer of a peft LoRA layer and its active, unmerged adapters (none for a plain layer)."""
    if not hasattr(module, "base_layer"):
        return module, []
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base, []  # a merged adapter already lives in the base weight
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(
                "DoRA adapters are not supported by the static rollout engine; set algorithm.rollout_engine=hf"
            )
        terms.append(LoraTerm(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return base, terms


def linear_op(module: nn.Module, merge: bool, dtype: torch.dtype) -> LinearOp:
    """The decoder's view of a policy projection: merged into a dense matrix, or packed with LoRA on the side."""
    base, loras = _split_lora(module)
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().to(dtype)
    # A layer whose forward multiplies by one weight of its own making says so (QAT: base plus adapter,
    # rounded as deployment rounds it); base plus the unrounded adapter would sample another policy.
    effective = getattr(module, "effective_weight", None)
    weight = effective() if effective is not None else None
    if weight is not None:
        if merge:
            return DenseLinear(weight.to(dtype), bias)
        return RebuiltLinear(effective, bias, dtype, weight.shape[0])
    if merge:
        weight = dense_weight(base)
        if loras:
            # summed in place in one fp32 copy (a dense model's own weight copied first): with `weight + scale *
            # (b @ a)` three fp32 matrices were live at once, the 7B gate's 0.63 GiB on top of the copies
            # already made (bench/rollout/results.md, "The planner's rollout terms")
            weight = weight.to(torch.float32, copy=isinstance(weight, nn.Parameter))
            for lora in loras:
                weight.addmm_(lora.b.float(), lora.a.float(), alpha=lora.scale)
        return DenseLinear(weight.to(dtype), bias)
    if type(base) is nn.Linear and base.weight.dtype == dtype and not loras:
        return DenseLinear(base.weight, bias)  # already dense: no per-step work
    return PackedLinear(base, bias, [LoraTerm(t.a.detach(), t.b.detach(), t.scale) for t in loras], dtype)
