"""The `packed` rollout engine: bitsandbytes 4-bit weights multiplied where they lie.

The static decoder's `dequant` form (`vrft.rollout.weights.PackedLinear`) dequantises each matrix to bf16
before its matmul; here the decode steps (at most `KERNEL_ROWS` rows) go through the fused kernel of
`vrft.kernels.nf4_matmul`, which decodes the packed codes in registers and never writes the bf16 matrix.
The LoRA term stays unmerged, as in `dequant`: `x A^T` is one small matmul and the kernel adds
`scale * (x A^T) B^T` before its single rounding of the output.

The prefill (the prompt, G-fold shared: hundreds of rows) is compute-bound: there the kernel would decode
every weight once per 64-row tile, so it dequantises each matrix once instead (one matrix of bf16 scratch,
as `dequant`); measured on the H200 in bench/rollout/results.md.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vrft.kernels.nf4_matmul import environment_unsupported, layout_unsupported, matmul_4bit, supports
from vrft.rollout.static import StaticDecodeEngine
from vrft.rollout.weights import LinearOp, PackedLinear, dense_weight

log = logging.getLogger(__name__)

KERNEL_ROWS = 64  # decode batches up to this many rows use the kernel; more rows (prefill) dequantise once
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PACKED_FIX = "set algorithm.rollout_engine=dequant (same memory, no kernel) or auto"


class KernelLinear(LinearOp):
    """A `PackedLinear` over a bitsandbytes `Linear4bit` whose decode-step matmuls run the fused kernel."""

    def __init__(self, packed: PackedLinear):
        self.base, self.bias, self.loras, self.dtype = packed.base, packed.bias, packed.loras, packed.dtype
        self.out_features = packed.out_features
        # `x A^T` in the dtype the training forward computes it in: under autocast (the precision plugin's
        # forward context, where rollouts run) F.linear would cast the fp32 A and x to the autocast dtype at
        # every call, two copies per projection per decode step (1.3 ms of a 7B step, profiled); cast A once
        # per rollout instead. The product is the same.
        fused = self.loras[0] if self.loras else None
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        self.lora_a = None if fused is None else fused.a.to(dtype or fused.a.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        """`x [..., in] -> [..., out]` in the decoder's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > KERNEL_ROWS:
            y = F.linear(rows, dense_weight(self.base).to(self.dtype), self.bias)
            extra = self.loras
        else:
            weight = self.base.weight
            fused, extra = (self.loras[0], self.loras[1:]) if self.loras else (None, [])
            lora_in = None if fused is None else F.linear(rows.to(self.lora_a.dtype), self.lora_a)
            y = matmul_4bit(
                rows,
                weight.data,
                weight.quant_state,
                self.bias,
                lora_in,
                None if fused is None else fused.b,
                1.0 if fused is None else fused.scale,
            )
        for lora in extra:  # a second active adapter (rare): added as `dequant` does
            y = y + lora(rows).to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def kernel_unsupported(op: LinearOp) -> str | None:
    """Why this decoder projection cannot use the kernel (not 4-bit, its layout, the device), or None."""
    if not isinstance(op, PackedLinear):
        return "not a packed layer"
    weight = getattr(op.base, "weight", None)
    if getattr(weight, "quant_state", None) is None:
        return f"a {type(op.base).__name__}, not a bitsandbytes 4-bit layer"
    if weight.quant_state.dtype != op.dtype:
        return f"its compute dtype {weight.quant_state.dtype} is not the decoder's {op.dtype}"
    if any(lora.a.shape[0] > 256 for lora in op.loras):
        return "LoRA rank above 256"
    return supports(weight)


def with_kernel_layers(weights):
    """The decoder weights with every supported 4-bit projection swapped for a `KernelLinear`.

    Layers the kernel does not handle keep the `dequant` form; the reasons are logged once per call.
    """
    reasons: dict[str, int] = {}

    def swap(op):
        reason = kernel_unsupported(op)
        if reason is None:
            return KernelLinear(op)
        if isinstance(op, PackedLinear):
            reasons[reason] = reasons.get(reason, 0) + 1
        return op

    layers = [
        dataclasses.replace(layer, **{f.name: swap(getattr(layer, f.name)) for f in dataclasses.fields(layer)
                                       if isinstance(getattr(layer, f.name), LinearOp)})
        for layer in weights.layers
    ]  # fmt: skip
    if reasons:
        log.warning("rollout_engine=packed: %s projections dequantise per step instead: %s",
                    sum(reasons.values()), "; ".join(f"{n} x {r}" for r, n in reasons.items()))  # fmt: skip
    return dataclasses.replace(weights, layers=layers, lm_head=swap(weights.lm_head))


def packed_unavailable(precision_name: str, precision_cfg) -> str | None:
    """Why `rollout_engine=packed` cannot run with this precision config here, or None if it can.

    Checked before the model is loaded: Triton and a CUDA device of compute capability >= 8.0, a 4-bit
    precision (`int4`), and a layout the kernel handles (quant type, compute dtype; blocksize 64).
    """
    if precision_name != "int4":
        return f"precision={precision_name} stores no bitsandbytes 4-bit weights for the kernel to read"
    reason = environment_unsupported()
    if reason:
        return reason
    cfg = precision_cfg or {}
    dtype = DTYPES.get(str(cfg.get("compute_dtype", "bf16")), torch.float32)
    return layout_unsupported(str(cfg.get("quant_type", "nf4")), 64, dtype, 64)


class PackedEngine(StaticDecodeEngine):
    """`packed`: as `dequant`, but decode-step matmuls read the 4-bit weights in the fused Triton kernel.

    Construction fails with the reason where the kernel cannot run (no Triton, no CUDA, an old GPU).
    """

    name = "packed"
    merge = False

    def __init__(self, cuda_graph: bool = True, stop_check_every: int = 32):
        super().__init__(cuda_graph, stop_check_every)
        reason = environment_unsupported()
        if reason:
            raise ValueError(f"algorithm.rollout_engine=packed cannot run here: {reason}; {PACKED_FIX}")

    def read_weights(self, policy: nn.Module):
        """The `dequant` form of the policy's weights, with every supported 4-bit projection on the kernel."""
        return with_kernel_layers(super().read_weights(policy))
