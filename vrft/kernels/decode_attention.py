"""Attention of one decode token per sequence over its KV cache, split along the cache (flash decoding).

Why hand-written: at decode, SDPA's fused kernels (cuDNN on the H200) run one program per (sequence, KV
head) query tile over the whole cache and took 28 us per 7B layer at 16 sequences, 0.8 ms of a decode step,
for ~24 MB of keys and values a layer (bench/rollout/results.md). Here each (sequence, KV head) is split
into slices of the cache that run side by side, every query head of the group in one tile, and a slice
stops at the step's column (read on the device, so the launch is the same in every CUDA-graph replay): the
columns not yet written are never read. The last slice of a tile to arrive (an atomic counter it resets)
merges the slices' softmax partials, as `nf4_epilogue.store_output` adds up K slices.

Numerics: scores and the softmax in fp32; the probabilities are rounded to the cache's dtype for the
tensor-core product with the values, as flash attention does; the output is rounded once. fp32 caches (the
tiny test model) multiply in full fp32, not TF32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrft.kernels.launch_order import launch_options
from vrft.kernels.workspace import multiprocessors, split_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder's SDPA runs instead
    triton = None

# Measured at the 7B shape, 16 sequences (bench/rollout/attention_sweep.py, results/tuning_call): 64 columns
# per step, 8 warps and 4 slices per (sequence, KV head) took 14.0-14.6 us against SDPA's 21.8-22.2; 4 warps
# 15.0-15.8, 32 columns 14.8-15.3, 128 columns 19.8-21.4, 8 slices 15.5-16.4, one slice 21.4-24.2.
BLOCK_L = 64  # cache columns per loop step
NUM_WARPS = 8
PROGRAMS_PER_SM = 2  # the split aims at this many programs per multiprocessor


def unsupported(head_dim: int) -> str | None:
    """Why the kernel cannot serve heads of `head_dim` (None: it can); the tensor-core dots need >= 16."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    return None


if triton is not None:
    from vrft.kernels.launch_order import wait_for_inputs

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, keys_ptr, values_ptr, valid_ptr, column_ptr, out_ptr, partial_ptr, stats_ptr, counter_ptr,
        kv_heads, groups, columns_per_split, scale, stride_qn, stride_qh, stride_cn, stride_ch, stride_cl,
        stride_valid, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        tile, split = tl.program_id(0), tl.program_id(1)
        splits = tl.num_programs(1)
        row, head = tile // kv_heads, tile % kv_heads
        group = tl.arange(0, BLOCK_G)
        dim = tl.arange(0, HEAD_DIM)
        mask_g = group < groups
        q = tl.load(
            q_ptr + row * stride_qn + head * stride_qh + group[:, None] * HEAD_DIM + dim[None, :],
            mask=mask_g[:, None],
            other=0.0,
        )
        cache = row.to(tl.int64) * stride_cn + head * stride_ch
        end = tl.load(column_ptr) + 1  # the step's token was written at `column`; later columns are empty
        start = split * columns_per_split
        stop = tl.minimum(start + columns_per_split, end)
        best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max score per query head
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp(score - best)
        acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
        for first in range(start, stop, BLOCK_L):
            column = first + tl.arange(0, BLOCK_L)
            inside = column < stop
            usable = inside & (tl.load(valid_ptr + row * stride_valid + column, mask=inside, other=0) != 0)
            slots = cache + column[:, None] * stride_cl + dim[None, :]
            keys = tl.load(keys_ptr + slots, mask=inside[:, None], other=0.0)
            score = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
            score = tl.where(usable[None, :], score * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(score, 1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing usable yet: no inf - inf
            weight = tl.exp(score - shift[:, None])
            decay = tl.exp(best - shift)
            values = tl.load(values_ptr + slots, mask=inside[:, None], other=0.0)
            total = total * decay + tl.sum(weight, 1)
            acc = acc * decay[:, None] + tl.dot(weight.to(values.dtype), values, input_precision=PRECISION)
            best = new_best
        outputs = out_ptr + ((row * kv_heads + head) * groups + group[:, None]) * HEAD_DIM + dim[None, :]
        if SPLIT:
            local = group[:, None] * HEAD_DIM + dim[None, :]
            partials = partial_ptr + tile.to(tl.int64) * splits * BLOCK_G * HEAD_DIM + local
            stats = stats_ptr + tile.to(tl.int64) * splits * 2 * BLOCK_G + group
            tl.store(partials + split * BLOCK_G * HEAD_DIM, acc)
            tl.store(stats + split * 2 * BLOCK_G, best)
            tl.store(stats + split * 2 * BLOCK_G + BLOCK_G, total)
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
            if arrived == splits - 1:  # the last slice of this tile: merge the slices, reset the counter
                best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
                for other in range(splits):
                    best = tl.maximum(best, tl.load(stats + other * 2 * BLOCK_G, cache_modifier=".cg"))
                shift = tl.where(best == float("-inf"), 0.0, best)
                total = tl.zeros((BLOCK_G,), dtype=tl.float32)
                acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
                for other in range(splits):
                    its_best = tl.load(stats + other * 2 * BLOCK_G, cache_modifier=".cg")
                    decay = tl.exp(its_best - shift)
                    total += decay * tl.load(stats + other * 2 * BLOCK_G + BLOCK_G, cache_modifier=".cg")
                    its_acc = tl.load(partials + other * BLOCK_G * HEAD_DIM, cache_modifier=".cg")
                    acc += decay[:, None] * its_acc
                tl.atomic_xchg(counter_ptr + tile, 0)
                out = acc / total[:, None]
                tl.store(outputs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:
            out = acc / total[:, None]
            tl.store(outputs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])


def decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    column: Tensor,
    scale: float,
    splits: int | None = None,
    block_l: int = BLOCK_L,
    num_warps: int = NUM_WARPS,
) -> Tensor:
    """Softmax attention of `q` over the cache columns `0..column` that `valid` marks.

    Args:
        q: `[N, kv_heads, groups, hd]`, the query heads that share a KV head side by side (contiguous rows).
        keys, values: `[N, kv_heads, Lmax, hd]` caches (unit last stride, one layout).
        valid: `[N, Lmax]` bool, the columns a query may attend to (padding off).
        column: `[1]` long, the step's column: later columns are not read.
        splits: slices of the cache per (sequence, KV head); default: enough for `PROGRAMS_PER_SM`.
        block_l, num_warps: columns per loop step and warps per program (benchmarks).
    Returns:
        `[N, kv_heads, groups, hd]` in `q`'s dtype (what SDPA returns for these inputs).
    """
    count, kv_heads, groups, head_dim = q.shape
    capacity = keys.shape[2]
    if (
        keys.stride() != values.stride()
        or keys.stride(-1) != 1
        or q.stride(-1) != 1
        or q.stride(2) != head_dim
    ):
        raise ValueError(f"decode_attention needs unit-stride heads: q {q.stride()}, keys {keys.stride()}")
    tiles = count * kv_heads
    blocks = triton.cdiv(capacity, block_l)
    if splits is None:
        splits = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * multiprocessors(q.device), tiles)))
    columns_per_split = triton.cdiv(blocks, splits) * block_l
    splits = triton.cdiv(capacity, columns_per_split)
    block_g = max(16, triton.next_power_of_2(groups))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # partial [tiles, splits, block_g, hd] fp32 and the arrival counters, as a split-K matmul's; per slice
    # also its running max and sum [2, block_g]
    partial, counters = split_workspace(q, (tiles, 1, splits), block_g, head_dim)
    stats = q.new_empty(tiles * splits * 2 * block_g if splits > 1 else 1, dtype=torch.float32)
    _decode_attention_kernel[(tiles, splits)](
        q, keys, values, valid.view(torch.uint8), column, out, partial, stats, counters, kv_heads, groups,
        columns_per_split, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        valid.stride(0), BLOCK_G=block_g, BLOCK_L=block_l, HEAD_DIM=head_dim, SPLIT=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no TF32 rounding
        num_warps=num_warps, **launch_options(q.device),
    )  # fmt: skip
    return out
