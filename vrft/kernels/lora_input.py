"""`x A^T`, the first half of the fused adapters' LoRA term, in one launch.

Why hand-written: at decode batches cuBLAS runs this `[M <= 64, K] x [K, r]` product (r the ranks of one
input group, 64..192 on Qwen2-VL-7B) as a split-K GEMM plus a separate reduce kernel, two launches of
~3 us each whatever the size, four times per decoder layer: 0.7 ms of a 7B decode step
(bench/rollout/results.md). Here the K slices' partial sums are added up by the last program of each tile
to arrive (`nf4_epilogue.store_output`, as the 4-bit kernel does): one launch, no reduce kernel, and the
same result on every run (no atomics on the sums). The output is rounded once to `x`'s dtype from fp32
sums, as cuBLAS's bf16 GEMM and autocast's `lora_A(x)` are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrft.kernels.launch_order import launch_options
from vrft.kernels.workspace import split_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the packed engine, its only caller, needs CUDA
    triton = None

STEP = 128  # columns of K per loop step
# The default split: slices of four loop steps, at most MAX_SPLIT (the last program to arrive adds up that
# many partial tiles). Measured at 16 rows (bench/rollout/results/tuning_call): K = 3584 split 7 took 5.0 us
# against 5.4 at 14 (two-step slices) and 8.5 unsplit; K = 18944 split 16 7.2 us against 8.0 at 32.
STEPS_PER_SLICE = 4
MAX_SPLIT = 16


if triton is not None:
    from vrft.kernels.launch_order import wait_for_inputs
    from vrft.kernels.nf4_epilogue import store_output

    @triton.jit
    def _lora_input_kernel(
        x_ptr, a_ptr, partial_ptr, counter_ptr, y_ptr, M, R, K, stride_xm, stride_am, stride_ym,
        iters_per_split, split_k, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_m, mask_n = rows_m < M, rows_n < R
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # A as the left operand: the ranks are wider
        first = pid_k * iters_per_split
        for step in range(first, tl.minimum(first + iters_per_split, tl.cdiv(K, BLOCK_K))):
            column = step * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = column < K
            a = tl.load(
                a_ptr + rows_n[:, None].to(tl.int64) * stride_am + column[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            x = tl.load(
                x_ptr + rows_m[None, :].to(tl.int64) * stride_xm + column[:, None],
                mask=mask_m[None, :] & mask_k[:, None],
                other=0.0,
            )
            acc = tl.dot(a, x, acc)
        store_output(
            tl.trans(acc), pid_m, pid_n, pid_k, rows_m, rows_n, mask_m, mask_n, partial_ptr, counter_ptr,
            split_k, y_ptr, y_ptr, stride_ym, BLOCK_M, BLOCK_R, SPLIT, False,
        )  # fmt: skip


def lora_input(x: Tensor, a: Tensor, split_k: int | None = None) -> Tensor:
    """`x [M, K] @ a^T [K, R]` -> `[M, R]` in `x.dtype` (`a` in it too), fp32 sums; M at most 64.

    `split_k` (default: slices of `STEPS_PER_SLICE` loop steps, at most `MAX_SPLIT`) is for benchmarks.
    """
    rows, in_features = x.shape
    ranks = a.shape[0]
    if rows > 64 or a.dtype != x.dtype or a.shape[1] != in_features:
        raise ValueError(
            f"lora_input takes x [M <= 64, K] and a [R, K] of one dtype, not {x.shape} {a.shape}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = max(16, triton.next_power_of_2(rows))
    block_r = 64 if ranks > 32 else max(16, triton.next_power_of_2(ranks))
    steps = triton.cdiv(in_features, STEP)
    if split_k is None:
        split_k = min(MAX_SPLIT, max(1, steps // STEPS_PER_SLICE))
    grid = (triton.cdiv(ranks, block_r), triton.cdiv(rows, block_m), split_k)
    y = torch.empty(rows, ranks, dtype=x.dtype, device=x.device)
    partial, counters = split_workspace(x, grid, block_m, block_r)
    _lora_input_kernel[grid](
        x, a, partial, counters, y, rows, ranks, in_features, x.stride(0), a.stride(0), y.stride(0),
        triton.cdiv(steps, split_k), split_k, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=STEP, SPLIT=split_k > 1,
        **launch_options(x.device),
    )  # fmt: skip
    return y
