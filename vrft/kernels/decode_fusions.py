"""The small element-wise work of a decode step, one launch per layer stage instead of a dozen.

Why hand-written: between its matmuls a decoder layer of `vrft.rollout.decoder` ran ~25 element-wise
kernels per decode step (RMSNorm as cast, norm, cast, scale; residual adds; rotary embedding as multiplies,
a negation, a concatenation and an add, for q and for k; two KV-cache index copies; SiLU and a multiply on
column views of the gate/up output), each a launch of 1-3 us on a 16-row batch: ~1.6 ms of GPU time in a
7B step (bench/rollout/results.md). torch.compile would fuse them, but it would also trace the 4-bit kernel
calls, recompile for every prompt length (the KV cache's size), and spend minutes compiling per rollout
shape on the GPU; these three kernels are all the decode step needs.

Each computes what the torch ops it replaces compute, rounding where they round (every bf16 op of torch
computes in fp32 and rounds its result):
- `add_rms_norm`: `hidden + delta`, then the policy's RMSNorm of it (`vrft.rollout.stages.rms_norm`).
  Equal to torch's up to the order of the fp32 sum of squares (torch reduces in its own order): its output
  can differ from torch's by one rounding step of the output dtype.
- `rope_into_cache`: rotary embedding of q and k (`x cos + rotate_half(x) sin`, each product rounded), k and
  v written to the KV cache at the step's column: bit for bit torch's.
- `silu_mul`: `silu(gate) * up`, with libdevice's `expf` and IEEE division as torch's CUDA kernel; how the
  compilers contract `1 + exp(-x)` can differ in the last fp32 bit, so the 16-bit SiLU can round one step
  away from torch's. The Triton interpreter (CPU tests) has no libdevice and uses `tl.exp` and `/`.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder's torch ops run instead
    triton = None

from vrft.kernels.launch_order import launch_options

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SILU_BLOCK = 1024  # columns of gate/up per program


def unsupported(device: torch.device, dtype: torch.dtype, hidden_size: int, head_dim: int) -> str | None:
    """Why the fused decode ops cannot serve this decoder (None: they can)."""
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda":
        return f"the fused decode ops run on CUDA, the decoder is on {device.type}"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of bf16, fp16, fp32"
    if head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    if hidden_size > 16384:
        return f"hidden size {hidden_size} > 16384 does not fit one program's row"
    return None


if triton is not None:
    from triton.language.extra import libdevice

    from vrft.kernels.launch_order import wait_for_inputs

    @triton.jit
    def _add(a, b, PTX: tl.constexpr):
        """`a + b` of fp32 values, rounded to fp32, as torch adds 16-bit tensors (before rounding to 16 bits).

        In PTX because the compiler would otherwise turn the 16-bit round trips into native bf16/fp16
        arithmetic and contract a product and this sum into one fma, rounding once where torch rounds twice
        (seen in the sm_90 PTX of the rotary kernel). The interpreter (no PTX) adds plainly.
        """
        if PTX:
            return tl.inline_asm_elementwise(
                "add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return a + b

    @triton.jit
    def _add_rms_norm_kernel(
        hidden_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, columns, eps,
        stride_h, stride_d, stride_s, stride_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
        PTX: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        row = tl.program_id(0)
        column = tl.arange(0, BLOCK)
        mask = column < columns
        x = tl.load(hidden_ptr + row * stride_h + column, mask=mask, other=0.0)
        dtype: tl.constexpr = x.dtype
        if HAS_DELTA:  # the residual add, rounded as torch's
            delta = tl.load(delta_ptr + row * stride_d + column, mask=mask, other=0.0)
            x = _add(x.to(tl.float32), delta.to(tl.float32), PTX).to(dtype)
            tl.store(sum_ptr + row * stride_s + column, x, mask=mask)
        x = x.to(tl.float32)
        variance = tl.sum(x * x, axis=0) / columns
        normed = (x * tl.math.rsqrt(variance + eps)).to(dtype)  # F.rms_norm in fp32, cast back
        weight = tl.load(weight_ptr + column, mask=mask, other=0.0)
        out = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * stride_o + column, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_into_cache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, out_ptr, keys_ptr, values_ptr, column_ptr,
        stride_q, stride_k, stride_v, stride_cs, stride_cn, stride_ch, stride_cl,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        # One program per (row, head); heads past HEADS are the KV heads: k rotated and v, into the cache.
        row, head = tl.program_id(0), tl.program_id(1)
        index = tl.arange(0, HEAD_DIM)
        half: tl.constexpr = HEAD_DIM // 2
        partner = (index + half) % HEAD_DIM  # rotate_half: (-x[half:], x[:half])
        cos = tl.load(cos_ptr + row * stride_cs + index).to(tl.float32)
        sin = tl.load(sin_ptr + row * stride_cs + index).to(tl.float32)
        kv_head = head - HEADS
        if head < HEADS:
            source = q_ptr + row * stride_q + head * HEAD_DIM
        else:
            source = k_ptr + row * stride_k + kv_head * HEAD_DIM
        x = tl.load(source + index)
        dtype: tl.constexpr = x.dtype
        other = tl.load(source + partner)
        rotated = tl.where(index < half, -other, other)
        first = (x.to(tl.float32) * cos).to(dtype)
        second = (rotated.to(tl.float32) * sin).to(dtype)
        y = _add(first.to(tl.float32), second.to(tl.float32), PTX).to(dtype)
        if head < HEADS:
            tl.store(out_ptr + (row * HEADS + head) * HEAD_DIM + index, y)
        else:
            slot = row * stride_cn + kv_head * stride_ch + tl.load(column_ptr) * stride_cl + index
            tl.store(keys_ptr + slot, y)
            tl.store(values_ptr + slot, tl.load(v_ptr + row * stride_v + kv_head * HEAD_DIM + index))

    @triton.jit
    def _silu_mul_kernel(
        gate_ptr, up_ptr, out_ptr, columns, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
        PTX: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        row, tile = tl.program_id(0), tl.program_id(1)
        column = tile * BLOCK + tl.arange(0, BLOCK)
        mask = column < columns
        gate = tl.load(gate_ptr + row * stride_g + column, mask=mask, other=0.0)
        up = tl.load(up_ptr + row * stride_u + column, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + column, silu_times(gate, up, PTX), mask=mask)

    @triton.jit
    def silu_times(gate, up, PTX: tl.constexpr):
        """`silu(gate) * up` of two 16-bit tensors, in their dtype, rounded where torch rounds (the module
        docstring). Creates no tensor of its own, so `nf4_mma`'s Gluon kernel calls it too
        (`_store_silu_pairs`)."""
        dtype: tl.constexpr = gate.dtype
        gate = gate.to(tl.float32)
        if PTX:  # torch's silu: x / (1 + expf(-x)), IEEE division
            silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
        else:
            silu = gate / (1.0 + tl.exp(-gate))
        return (silu.to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)


def _rows(x: Tensor) -> Tensor:
    """`x [..., C]` as a 2-D `[R, C]` view with unit column stride (a copy only if there is none)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_rms_norm(hidden: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(hidden + delta, weight * rms_norm(hidden + delta))`; without `delta`, `(hidden, its norm)`.

    The norm's dtype is torch's promotion of `weight` and `hidden` (as `weight * normed` promotes).
    """
    columns = hidden.shape[-1]
    rows = _rows(hidden)
    total = torch.empty_like(rows) if delta is not None else rows
    deltas = _rows(delta) if delta is not None else rows
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, hidden.dtype), device=hidden.device)
    block = triton.next_power_of_2(columns)
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, deltas, weight, total, out, columns, eps, rows.stride(0), deltas.stride(0), total.stride(0),
        out.stride(0), HAS_DELTA=delta is not None, BLOCK=block, PTX=hidden.is_cuda,
        num_warps=max(1, min(16, block // 256)), **launch_options(hidden.device),
    )  # fmt: skip
    return total.view(hidden.shape), out.view(hidden.shape)


def rope_into_cache(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, column: Tensor
) -> Tensor:
    """Rotary embedding of one decode token per row; k and v go into the cache at `column`.

    Args:
        q, k, v: `[N, 1, heads * hd]`, `[N, 1, kv_heads * hd]` (rows may be strided: column views of one
            projection output).
        cos, sin: `[N, 1, hd]`.
        keys, values: `[N, kv_heads, Lmax, hd]` caches, written in place at `column` (a `[1]` long tensor).
    Returns:
        rotated q `[N, heads, 1, hd]`, contiguous.
    """
    count, kv_heads, _, head_dim = keys.shape
    heads = q.shape[-1] // head_dim
    q, k, v = _rows(q), _rows(k), _rows(v)
    cos, sin = _rows(cos), _rows(sin)
    out = torch.empty(count, heads, 1, head_dim, dtype=q.dtype, device=q.device)
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError(
            f"keys and values need one layout with unit last stride: {keys.stride()}, {values.stride()}"
        )
    _rope_into_cache_kernel[(count, heads + kv_heads)](
        q, k, v, cos, sin, out, keys, values, column, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), HEADS=heads, HEAD_DIM=head_dim, PTX=q.is_cuda,
        num_warps=max(1, min(4, head_dim // 128)), **launch_options(q.device),
    )  # fmt: skip
    return out


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) * up` (`[..., C]` each, rows may be strided), contiguous."""
    columns = gate.shape[-1]
    gates, ups = _rows(gate), _rows(up)
    out = torch.empty(gates.shape, dtype=gate.dtype, device=gate.device)
    grid = (gates.shape[0], triton.cdiv(columns, SILU_BLOCK))
    _silu_mul_kernel[grid](
        gates, ups, out, columns, gates.stride(0), ups.stride(0), out.stride(0), BLOCK=SILU_BLOCK,
        PTX=gate.is_cuda, num_warps=4, **launch_options(gate.device),
    )  # fmt: skip
    return out.view(gate.shape)
