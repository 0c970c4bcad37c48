"""The output side of `nf4_matmul`'s kernel: the LoRA term, and from a program's fp32 sums to `y`.

With a split K (`SPLIT`), each program's partial sums go to an fp32 workspace and an atomic counter per
output tile counts the arrivals; the last program to arrive adds the partials up, resets the counter (so
CUDA-graph replays start from zero again), and alone adds the bias and writes `y`.

The LoRA term `scale * (x A^T) B^T` is not left to that last program: the K slices of each tile add it to
their own sums after their K loops, 16 ranks each in turn, on the tensor cores. Done after the reduction,
by the arriving program alone and on the CUDA cores in fp32, it was a serial tail of ~72 us per 7B decoder
layer at rank 64; by the last slice alone, after its loop, 25 us (bench/rollout/results.md).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_term(
    acc, rows_m, rows_n, mask_m, mask_n, lora_in_ptr, lora_b_ptr, lora_scale, lora_rank, stride_lm,
    pid_k, split_k, DTYPE: tl.constexpr, LORA_RANK: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """`acc` plus this K slice's share of `scale * (x A^T) B^T`, `acc` as the K loop holds it
    (`[BLOCK_N, BLOCK_M]` when TRANSPOSED). Over the `split_k` slices of a tile the shares add up to the term.

    Both operands are rounded to the compute dtype and summed in fp32, as the training forward computes the
    adapter under autocast (two bf16 matmuls with fp32 accumulation). Ranks go 16 at a time: with 32 or 64
    per dot the tile of B held in registers took the kernel from 126 registers (as without LoRA) to 130-255
    (sm_90, `nf4_offline.registers`), and before the K loop instead of after it to 139, fewer programs per SM.
    """
    CHUNK: tl.constexpr = min(LORA_RANK, 16)
    # The rank's chunks are dealt out over the tile's K slices, from the last one (whose share of K may be
    # shorter) backwards: with a split of 4 or more, each slice of a rank-64 tile adds one chunk instead of
    # the last slice adding all four while the others have finished.
    first = (split_k - 1 - pid_k) * CHUNK
    for start in tl.range(first, lora_rank, split_k * CHUNK, num_stages=1):  # runtime bounds: kept rolled
        rank = start + tl.arange(0, CHUNK)
        in_rank = (rank < lora_rank)[None, :]
        xa = tl.load(
            lora_in_ptr + rows_m[:, None] * stride_lm + rank[None, :],
            mask=mask_m[:, None] & in_rank,
            other=0.0,
        ).to(DTYPE)  # [BLOCK_M, CHUNK]
        b = tl.load(
            lora_b_ptr + rows_n[:, None] * lora_rank + rank[None, :],
            mask=mask_n[:, None] & in_rank,
            other=0.0,
        ).to(DTYPE)  # [BLOCK_N, CHUNK]
        if TRANSPOSED:
            acc += lora_scale * tl.dot(b, tl.trans(xa))
        else:
            acc += lora_scale * tl.dot(xa, tl.trans(b))
    return acc


@triton.jit
def store_output(
    acc, pid_m, pid_n, pid_k, rows_m, rows_n, mask_m, mask_n, partial_ptr, counter_ptr, split_k,
    bias_ptr, y_ptr, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """`y[rows_m, rows_n] = sum over K slices of acc [BLOCK_M, BLOCK_N] (+ bias)`, in y's dtype."""
    if SPLIT:  # split_k > 1; the split itself is a runtime value, so one compiled variant serves all
        tile = pid_m * tl.num_programs(0) + pid_n
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        partials = partial_ptr + tile.to(tl.int64) * (split_k * BLOCK_M * BLOCK_N) + local
        tl.store(partials + pid_k * (BLOCK_M * BLOCK_N), acc)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:  # the last slice of this tile: reduce, finish, reset the counter
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(split_k):
                acc += tl.load(partials + split * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + tile, 0)
            finish_output(acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, y_ptr, stride_ym, HAS_BIAS)
    else:
        finish_output(acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, y_ptr, stride_ym, HAS_BIAS)


@triton.jit
def finish_output(acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
