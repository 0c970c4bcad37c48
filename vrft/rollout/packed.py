"""The `packed` rollout engine: bitsandbytes 4-bit weights multiplied where they lie.

The static decoder's `dequant` form (`vrft.rollout.weights.PackedLinear`) dequantises each matrix to bf16
before its matmul; here the decode steps (at most `KERNEL_ROWS` rows) go through the fused kernel of
`vrft.kernels.nf4_matmul`, which decodes the packed codes in registers and never writes the bf16 matrix.
The LoRA term stays unmerged, as in `dequant`: `x A^T` is one small matmul (`vrft.kernels.lora_input`)
and the kernel adds `scale * (x A^T) B^T` before its single rounding of the output. Projections that read
the same input (q/k/v, gate/up) share one `x A^T` over their concatenated A matrices (`SharedLoraInput`)
and one kernel launch (`KernelGroup`).

The prefill (the prompt, G-fold shared: hundreds of rows) is compute-bound: there the kernel would decode
every weight once per 64-row tile, so it dequantises each matrix once instead (one matrix of bf16 scratch,
as `dequant`); measured on the H200 in bench/rollout/results.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vrft.kernels.lora_input import lora_input
from vrft.kernels.nf4_matmul import (
    MAX_LORA_RANK,
    check_mma_switch,
    environment_unsupported,
    layout_unsupported,
    matmul_4bit,
    matmul_4bit_segments,
    matmul_4bit_silu,
    silu_pairs_unsupported,
    supports,
)
from vrft.kernels.nf4_segments import segments, segments_unsupported
from vrft.rollout.static import StaticDecodeEngine
from vrft.rollout.weights import LinearOp, PackedLinear, dense_weight

log = logging.getLogger(__name__)

KERNEL_ROWS = 64  # decode batches up to this many rows use the kernel; more rows (prefill) dequantise once
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The decode step's `silu(gate) * up` written by the gate/up launch itself (`matmul_4bit_silu`) where
# `nf4_mma` serves it, instead of a SiLU launch of its own after it: one launch fewer a layer, the same bits.
# 7B int4, 16 sequences, H100: 5.08 ms a decode step against 5.17 (bench/rollout/results.md, "The SiLU in
# the gate/up launch").
FOLD_SILU = True
PACKED_FIX = "set algorithm.rollout_engine=dequant (same memory, no kernel) or auto"


class _OncePerInput:
    """A value computed once per input tensor: the decoder hands the same `x` to every projection that
    reads it. A new tensor, or `x` changed in place since, computes it again (an inference tensor, whose
    changes are not counted, every time)."""

    def __init__(self):
        self._input: Tensor | None = None  # the last input, held so that its id cannot be reused
        self._version: int | None = None
        self._value: Tensor | None = None

    def get(self, x: Tensor, compute) -> Tensor:
        version = None if x.is_inference() else x._version
        if x is not self._input or version is None or version != self._version:
            self._value = compute()
            self._input, self._version = x, version
        return self._value


class SharedLoraInput:
    """`x A^T` for the projections of a decoder layer that read the same input, as one matmul.

    Every fused adapter of the engine reads its `x A^T` from one of these: a group of one (o, down,
    lm_head) until `group_projections` puts it with the projections that read the same input.
    Why: cuBLAS runs each small `x A^T` as a GEMM plus a split-K reduce, ~6 us whatever its size, and a 7B
    decode step has seven per layer (1.2 ms of 12.5: bench/rollout/results.md). q/k/v and gate/up read the
    same `x`, so their A matrices are concatenated once per rollout and multiplied once per input: four
    launches per layer. Each projection reads its columns of the product (the kernel takes strided rows).
    """

    def __init__(self, lora_as: list[Tensor]):
        self.weight = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as)  # [sum of ranks, in]
        ends = list(itertools.accumulate(a.shape[0] for a in lora_as))
        self.columns = [slice(end - a.shape[0], end) for a, end in zip(lora_as, ends, strict=True)]
        self._product = _OncePerInput()

    def product(self, x: Tensor, rows: Tensor) -> Tensor:
        """`rows [M, in] -> [M, sum of ranks]`, computed once per input `x` (of which `rows` is the 2-D view).

        Decode rows on CUDA in a 16-bit dtype go through `lora_input` (one launch; cuBLAS's split-K GEMM is
        two), anything else through `F.linear`. Either way x's writer has finished before any kernel launched
        after the product starts (`lora_input` waits for it before it lets the next kernel start, cuBLAS never
        lets it start early), so the matmul that reads the product may promise `x_ready`
        (`nf4_mma.launch`): its K loop then runs while `lora_input` works."""

        def compute():
            inputs = rows.to(self.weight.dtype)
            if inputs.is_cuda and inputs.shape[0] <= KERNEL_ROWS and inputs.dtype in DTYPES.values():
                return lora_input(inputs, self.weight)
            return F.linear(inputs, self.weight)

        return self._product.get(x, compute)


class KernelGroup:
    """The decode-step matmuls of projections that read one input (q/k/v, gate/up) as one kernel launch
    (`vrft.kernels.nf4_segments` says why): their outputs side by side, computed once per input; each projection
    returns its columns."""

    def __init__(self, ops: list[KernelLinear]):
        self.lora = ops[0].shared[0] if ops[0].shared else None
        self.scale = ops[0].loras[0].scale if ops[0].loras else 1.0
        self.segments = segments([op.segment() for op in ops])
        ends = list(itertools.accumulate(self.segments.out_features))
        self.columns = [slice(end - n, end) for n, end in zip(self.segments.out_features, ends, strict=True)]
        self._output = _OncePerInput()
        self._gated = _OncePerInput()

    def _lora_in(self, x: Tensor, rows: Tensor) -> Tensor | None:
        """The group's shared `x A^T` (once per input `x`), None without adapters."""
        return None if self.lora is None else self.lora.product(x, rows)

    def output(self, x: Tensor, rows: Tensor) -> Tensor:
        """`rows [M, in] -> [M, sum of out_features]` (M <= KERNEL_ROWS), once per input `x`."""

        def compute():
            lora_in = self._lora_in(x, rows)
            return matmul_4bit_segments(rows, self.segments, lora_in, self.scale, x_ready=lora_in is not None)

        return self._output.get(x, compute)

    def gated(self, x: Tensor, rows: Tensor) -> Tensor | None:
        """`silu(gate) * up` `[M, out_features]` of a gate/up group in its one launch (`matmul_4bit_silu`),
        once per input `x`; None where `FOLD_SILU` is off or the launch cannot write it."""
        if not FOLD_SILU or silu_pairs_unsupported(rows, self.segments) is not None:
            return None

        def compute():
            lora_in = self._lora_in(x, rows)
            return matmul_4bit_silu(rows, self.segments, lora_in, self.scale, x_ready=lora_in is not None)

        return self._gated.get(x, compute)


class KernelLinear(LinearOp):
    """A `PackedLinear` over a bitsandbytes `Linear4bit` whose decode-step matmuls run the fused kernel."""

    def __init__(self, packed: PackedLinear):
        self.base, self.bias, self.loras, self.dtype = packed.base, packed.bias, packed.loras, packed.dtype
        self.out_features = packed.out_features
        # `x A^T` in the dtype the training forward computes it in: under autocast (the precision plugin's
        # forward context, where rollouts run) F.linear would cast the fp32 A and x to the autocast dtype at
        # every call, two copies per projection per decode step (1.3 ms of a 7B step, profiled); cast A once
        # per rollout instead. The product is the same.
        self.shared: tuple[SharedLoraInput, slice] | None = None  # the fused adapter's x A^T, and its columns
        if self.loras:
            a = self.loras[0].a
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else a.dtype
            own = SharedLoraInput([a.to(dtype)])
            self.shared = (own, own.columns[0])
        self.grouped: tuple[KernelGroup, slice] | None = None  # one launch with others, and its columns

    def segment(self) -> tuple:
        """This projection as a weight of a `KernelGroup`: `(packed, quant_state, bias, lora_b, lora_column)`."""
        weight = self.base.weight
        lora_b = self.loras[0].b if self.loras else None
        return (
            weight.data,
            weight.quant_state,
            self.bias,
            lora_b,
            self.shared[1].start if self.shared else None,
        )

    def silu_mul_with(self, up: LinearOp, x: Tensor) -> Tensor | None:
        rows = x.reshape(-1, x.shape[-1])
        paired = getattr(up, "grouped", None)
        if (
            rows.shape[0] > KERNEL_ROWS
            or self.grouped is None
            or paired is None
            or paired[0] is not self.grouped[0]
        ):
            return None
        if self.grouped[1].start != 0:  # the kernel's order: the gate's tiles first, then the up's
            return None
        gated = self.grouped[0].gated(x, rows)
        return None if gated is None else gated.reshape(*x.shape[:-1], self.out_features)

    def __call__(self, x: Tensor) -> Tensor:
        """`x [..., in] -> [..., out]` in the decoder's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= KERNEL_ROWS and self.grouped is not None:
            group, columns = self.grouped
            return group.output(x, rows)[:, columns].reshape(*x.shape[:-1], self.out_features)
        if rows.shape[0] > KERNEL_ROWS:
            y = F.linear(rows, dense_weight(self.base).to(self.dtype), self.bias)
            extra = self.loras
        else:
            weight, extra = self.base.weight, self.loras[1:]
            lora = ()  # the first adapter, fused: (x A^T, B, scale)
            if self.shared is not None:
                group, columns = self.shared
                lora = (group.product(x, rows)[:, columns], self.loras[0].b, self.loras[0].scale)
            y = matmul_4bit(rows, weight.data, weight.quant_state, self.bias, *lora, x_ready=bool(lora))
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
    if any(lora.a.shape[0] > MAX_LORA_RANK for lora in op.loras):
        return f"LoRA rank above {MAX_LORA_RANK}"
    return supports(weight)


SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))  # projections of a decoder layer that read the same input


def group_projections(layer) -> None:
    """Group the kernel projections of `layer` that read one input, all or none of a group.

    Their adapters first: one `SharedLoraInput` where each is a `KernelLinear` with a fused adapter whose A
    has the others' dtype and width (their own groups of one, and so their copies of A, are dropped: A is
    held once). Then their matmuls: one `KernelGroup` where, besides, none has a second adapter, all or none
    have an adapter, the adapters share one scale and `nf4_matmul.segments_unsupported` finds nothing.
    """
    for names in SHARED_INPUTS:
        ops = [getattr(layer, name) for name in names]
        if not all(isinstance(op, KernelLinear) for op in ops):
            continue
        lora_as = [op.shared[0].weight for op in ops if op.shared is not None]
        if len(lora_as) == len(ops) and len({(a.dtype, a.shape[1], a.device) for a in lora_as}) == 1:
            group = SharedLoraInput(lora_as)
            for op, columns in zip(ops, group.columns, strict=True):
                op.shared = (group, columns)
        shared = {id(op.shared[0]) if op.shared else None for op in ops}
        scales = {op.loras[0].scale if op.loras else None for op in ops}
        if any(len(op.loras) > 1 for op in ops) or len(shared) > 1 or len(scales) > 1:
            continue
        reason = segments_unsupported([op.segment() for op in ops])
        if reason is not None:
            log.debug("rollout_engine=packed: %s stay separate launches: %s", "/".join(names), reason)
            continue
        kernels = KernelGroup(ops)
        for op, columns in zip(ops, kernels.columns, strict=True):
            op.grouped = (kernels, columns)


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
    for layer in layers:
        group_projections(layer)
    if reasons:
        log.warning("rollout_engine=packed: %s projections dequantise per step instead: %s",
                    sum(reasons.values()), "; ".join(f"{n} x {r}" for r, n in reasons.items()))  # fmt: skip
    return dataclasses.replace(weights, layers=layers, lm_head=swap(weights.lm_head))


def packed_unavailable(precision_name: str, precision_cfg) -> str | None:
    """Why `rollout_engine=packed` cannot run with this precision config here, or None if it can.

    Checked before the model is loaded: Triton and a CUDA device of compute capability >= 8.0, a 4-bit
    precision (`int4`), and a layout the kernel handles (quant type, compute dtype; blocksize 64). Raises
    on a VRFT_NF4_MMA other than 0 or 1.
    """
    check_mma_switch()  # a bad VRFT_NF4_MMA is the user's to fix, not a reason to fall back
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

    def __init__(self, cuda_graph: bool = True, stop_check_every: int = 32, fused_decode: bool = True):
        super().__init__(cuda_graph, stop_check_every, fused_decode)
        check_mma_switch()
        reason = environment_unsupported()
        if reason:
            raise ValueError(f"algorithm.rollout_engine=packed cannot run here: {reason}; {PACKED_FIX}")

    def read_weights(self, policy: nn.Module):
        """The `dequant` form of the policy's weights, with every supported 4-bit projection on the kernel."""
        return with_kernel_layers(super().read_weights(policy))
