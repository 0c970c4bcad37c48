"""The end of `nf4_matmul`'s kernel: from a program's fp32 sums to `y`, once per output tile.

With a split K (`SPLIT`), each program's partial sums go to an fp32 workspace and an atomic counter per
output tile counts the arrivals; the last program to arrive adds the partials up, resets the counter (so
CUDA-graph replays start from zero again), and alone adds the bias and the LoRA term and writes `y`.
"""

from __future__ import annotations

import triton
import triton.language as tl

LORA_CHUNK: tl.constexpr = tl.constexpr(
    16
)  # adapter ranks per step of the LoRA term (LORA_RANK is a multiple)


@triton.jit
def store_output(
    acc, pid_m, pid_n, pid_k, rows_m, rows_n, mask_m, mask_n, partial_ptr, counter_ptr, split_k,
    bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale, lora_rank, stride_lm, y_ptr, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    LORA_RANK: tl.constexpr,
):  # fmt: skip
    """`y[rows_m, rows_n] = sum over K slices of acc [BLOCK_M, BLOCK_N] (+ bias) (+ LoRA)`, in y's dtype."""
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
            _finish(acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale,
                    y_ptr, stride_lm, stride_ym, lora_rank, HAS_BIAS, LORA_RANK)  # fmt: skip
    else:
        _finish(acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale,
                y_ptr, stride_lm, stride_ym, lora_rank, HAS_BIAS, LORA_RANK)  # fmt: skip


@triton.jit
def _finish(
    acc, rows_m, rows_n, mask_m, mask_n, bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale,
    y_ptr, stride_lm, stride_ym, lora_rank, HAS_BIAS: tl.constexpr, LORA_RANK: tl.constexpr,
):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if LORA_RANK > 0:  # scale * (x A^T) B^T in fp32, as peft computes an fp32 adapter
        # LORA_CHUNK ranks at a time, in a loop the compiler keeps rolled: the fp32 (CUDA-core) dot holds both
        # operands in registers, and the whole rank at once (64) took the kernel to 255 registers with spills
        # (compiled for sm_90, nf4_offline), which slowed its K loop too: one kernel, one register budget.
        for start in tl.range(0, lora_rank, LORA_CHUNK, num_stages=1):  # a runtime bound: kept rolled
            rank = start + tl.arange(0, LORA_CHUNK)
            in_rank = rank[None, :] < lora_rank
            xa = tl.load(
                lora_in_ptr + rows_m[:, None] * stride_lm + rank[None, :], mask=mask_m[:, None] & in_rank
            )
            b = tl.load(
                lora_b_ptr + rows_n[:, None] * lora_rank + rank[None, :], mask=mask_n[:, None] & in_rank
            )
            acc += lora_scale * tl.dot(xa.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    y = y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
