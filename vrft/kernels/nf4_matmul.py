"""`y = x W^T + b (+ LoRA)` on a bitsandbytes 4-bit weight, read packed: no bf16 copy of `W` is ever written.

Why hand-written: bitsandbytes' own 4-bit matmul has a fused kernel for one input row only (its gemv); for
any other batch it dequantises the whole matrix to bf16 in memory and calls cuBLAS, so at the decode batches
of GRPO (8..64 rows) every step writes and re-reads 4 bytes per weight on top of the 0.5 it stores.

Storage, as `bitsandbytes.functional.quantize_4bit` writes it (0.4x-0.50; `dequantize_4bit` is the
reference this module is tested against): the `[N, K]` weight flattened row-major; element `2i` in the high
nibble of byte `i`, element `2i + 1` in the low nibble; one absmax per `blocksize` consecutive elements; a
weight is `code[nibble] * absmax` computed in fp32 and rounded to the compute dtype. With double
quantisation the absmax is itself a uint8 code: `state2.code[q] * state2.absmax[block // state2.blocksize]
+ offset`, in fp32. The kernel decodes exactly these values in registers, so it multiplies by the same bf16
weights as the training forward; only the order of the fp32 accumulation differs.

The kernel: one program per (row tile of `x`, tile of `BLOCK_N` output features, slice of K). Each loop
step decodes a `[BLOCK_N, BLOCK_K]` tile of weights in registers (the packed words viewed as
`[BLOCK_N, BLOCK_K / 8, 8]`, shifted and masked to codes, looked up in the 16-entry code book by a register
shuffle, multiplied by their absmax) and makes one tensor-core dot of it with the matching `x` columns, the
weight tile as the left operand (`y^T = W x^T`: the few decode rows are the MMA's narrow side). With a split
K, partial sums go to an fp32 workspace and the last program of a tile to arrive (an atomic counter, which
that program resets, so CUDA-graph replays start from zero) adds them up, then the bias and the LoRA term,
and writes `y` once.

Measured on the H200 at 16 rows (bench/rollout/results.md): 12-13% of the bandwidth bound on Qwen2-VL-7B's
large projections, about 2x faster than dequantise-then-matmul; the per-weight decoding work, not memory,
bounds it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: supports() says why, reference_matmul still works
    triton = None

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256)  # one block per loop iteration: [BLOCK_N, blocksize / 2] bytes
DTYPES = (torch.bfloat16, torch.float16)
MAX_LORA_RANK = 256
# launch_config's choices, from bench/rollout/kernel_sweep.py --sweep on the H200 at 16 rows (results in
# bench/rollout/results/kernel_sweep.json): on Qwen2-VL-7B's four projection shapes the shuffle lookup beat
# the L1 load by 2-10x, the weight tile as left operand won on the three larger shapes, BLOCK_K 256 and
# BLOCK_N 128 lost on all but q/o (within 10% there), and 8 programs per SM beat 4 by ~5-10%.
DEFAULTS = {
    "BLOCK_N": 64,  # output features per program
    "BLOCK_K": 128,  # weights of each row decoded per loop step (at least one quantisation block)
    "GATHER": 1,  # code-book lookup: 1 a register shuffle (tl.gather), 0 an L1-cached load
    "TRANSPOSED": 1,  # 1: the weight tile is the MMA's left operand (y^T = W x^T), 0: x is
    "num_warps": 4,
    "num_stages": 3,
    "programs_per_sm": 8,  # the K split aims at this many programs per multiprocessor
}
_COUNTERS: dict[torch.device, Tensor] = {}  # per device: split-K arrival counters, always left at zero


def environment_unsupported(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run on `device` (default: the current CUDA device), or None if it can."""
    if triton is None:
        return "Triton is not installed (it ships with the CUDA builds of torch)"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the kernel needs a CUDA device, the weights are on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 (bf16 tensor cores are needed)"
    return None


def layout_unsupported(quant_type: str, blocksize: int, dtype: torch.dtype, in_features: int) -> str | None:
    """Why a 4-bit layout is not handled (quant type, block size, compute dtype, row length), or None."""
    if quant_type not in QUANT_TYPES:
        return f"quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}"
    if blocksize not in BLOCKSIZES:
        return f"blocksize {blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}"
    if dtype not in DTYPES:
        return f"compute dtype {dtype} is not bf16 or fp16"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of the blocksize {blocksize}"
    return None


def supports(weight) -> str | None:
    """Why this bitsandbytes `Params4bit` cannot go through the kernel (None: it can).

    Checks the environment (Triton, CUDA, compute capability >= 8.0) and the layout: quant type, block
    size, compute dtype, uint8 storage, the row length and the double-quantisation state.
    """
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "the weight has no quant_state (not a quantised bitsandbytes Params4bit)"
    if getattr(state, "packing_format_for_cpu", False):
        return "the weight was repacked into bitsandbytes' CPU layout"
    if weight.dtype != torch.uint8:
        return f"the packed storage is {weight.dtype}, not uint8"
    reason = layout_unsupported(state.quant_type, state.blocksize, state.dtype, state.shape[1])
    if reason is None and state.nested:
        nested = state.state2.blocksize
        if nested & (nested - 1) or state.state2.code.numel() != 256:
            reason = f"the double-quantised absmax has blocksize {nested} / a {state.state2.code.numel()}-entry code"
    return reason or environment_unsupported(weight.device)


def reference_matmul(x: Tensor, packed: Tensor, quant_state, bias: Tensor | None = None) -> Tensor:
    """bitsandbytes' dequantise-then-matmul: `x [M, K] -> [M, N]` in `x.dtype`, the kernel's reference."""
    import bitsandbytes.functional as bnb_functional

    weight = bnb_functional.dequantize_4bit(packed, quant_state).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


if triton is not None:

    @triton.jit
    def _matmul_4bit_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
        bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale, partial_ptr, counter_ptr, y_ptr,
        M, N, K, stride_xm, stride_lm, stride_ym, lora_rank, iters_per_split, split_k,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        HAS_BIAS: tl.constexpr, LORA_RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        GATHER: tl.constexpr, TRANSPOSED: tl.constexpr,
    ):  # fmt: skip
        # BLOCK_K weights of each of BLOCK_N rows per iteration: BLOCK_K / 8 packed int32 words per row; word w
        # holds elements 8w..8w+7, element 8w + p in byte p // 2, high nibble for even p (little-endian bytes).
        WORDS: tl.constexpr = BLOCK_K // 8
        SCALES: tl.constexpr = max(1, BLOCK_K // BLOCKSIZE)  # absmax blocks per iteration
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rows_m < M, rows_n < N
        words_per_row = K // 8
        blocks_per_row = K // BLOCKSIZE
        word = tl.arange(0, WORDS)
        position = tl.arange(0, 8)
        shift = 8 * (position // 2) + 4 * (1 - position % 2)  # [8] bit offset of element p within its word
        row_words = packed_ptr + rows_n[:, None].to(tl.int64) * words_per_row
        row_blocks = rows_n.to(tl.int64) * blocks_per_row  # [BLOCK_N] each row's first absmax index
        x_rows = x_ptr + rows_m.to(tl.int64) * stride_xm
        if GATHER:  # the 16-entry code book in registers, looked up by a shuffle; else an L1-cached load
            code = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
        if NESTED:
            offset = tl.load(offset_ptr)
        if TRANSPOSED:  # y^T = W x^T: the decoded weight tile is the MMA's A operand, taken from registers
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * iters_per_split  # slices of whole steps; steps past the row's end are masked off
        for step in range(first, first + iters_per_split):
            in_row = step * WORDS + word  # [WORDS] word index within the row
            mask_k = in_row < words_per_row
            words = tl.load(row_words + in_row[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
            nibbles = tl.reshape((words[:, :, None] >> shift[None, None, :]) & 15, (BLOCK_N, BLOCK_K))
            if GATHER:
                value = tl.gather(code, nibbles, axis=1)
            else:
                value = tl.load(code_ptr + nibbles)
            block_in_row = step * BLOCK_K // BLOCKSIZE + tl.arange(0, SCALES)
            block = row_blocks[:, None] + block_in_row[None, :]  # [BLOCK_N, SCALES]
            mask_s = mask_n[:, None] & (block_in_row < blocks_per_row)[None, :]
            if NESTED:
                quantised = tl.load(absmax_ptr + block, mask=mask_s, other=0).to(tl.int32)
                scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask_s, other=0.0)
                scale = tl.load(code2_ptr + quantised) * scale2 + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=mask_s, other=0.0)
            if SCALES > 1:
                scale = tl.reshape(
                    tl.broadcast_to(scale[:, :, None], (BLOCK_N, SCALES, BLOCK_K // SCALES)),
                    (BLOCK_N, BLOCK_K),
                )
            weight = (value * scale).to(
                x_ptr.dtype.element_ty
            )  # [BLOCK_N, BLOCK_K], as dequantize_4bit rounds
            column = step * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_c = column < K
            if TRANSPOSED:
                x_part = tl.load(
                    x_rows[None, :] + column[:, None], mask=mask_m[None, :] & mask_c[:, None], other=0.0
                )  # [BLOCK_K, BLOCK_M]
                acc = tl.dot(weight, x_part, acc)
            else:
                x_part = tl.load(
                    x_rows[:, None] + column[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0
                )  # [BLOCK_M, BLOCK_K]
                acc = tl.dot(x_part, tl.trans(weight), acc)
        if TRANSPOSED:
            acc = tl.trans(acc)

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
            rank = tl.arange(0, LORA_RANK)
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


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter on CPU tensors (tests)
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(
    rows: int, out_features: int, in_features: int, blocksize: int, device, **choices: int
) -> dict:
    """Tile sizes and K split for one call: enough programs to keep every multiprocessor streaming bytes.

    `choices` override `DEFAULTS` (the K split follows them); benchmarks sweep them.
    """
    chosen = {**DEFAULTS, **choices}
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n, block_k = chosen["BLOCK_N"], max(chosen["BLOCK_K"], blocksize)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    steps = _steps_per_row(in_features, block_k)
    wanted = triton.cdiv(chosen["programs_per_sm"] * _multiprocessors(device), tiles)
    split_k = min(wanted, max(steps // 2, 1), 32)  # slices of >= 2 steps; the last may be shorter (masked)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "SPLIT_K": split_k,
        **{key: chosen[key] for key in ("GATHER", "TRANSPOSED", "num_warps", "num_stages")},
    }


def _steps_per_row(in_features: int, block_k: int) -> int:
    """Loop iterations over one weight row: `block_k` weights per iteration."""
    return triton.cdiv(in_features, block_k)


def _counters(device: torch.device, count: int) -> Tensor:
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def matmul_4bit(
    x: Tensor,
    packed: Tensor,
    quant_state,
    bias: Tensor | None = None,
    lora_in: Tensor | None = None,
    lora_b: Tensor | None = None,
    lora_scale: float = 1.0,
    config: dict | None = None,
) -> Tensor:
    """`x [M, K] @ W^T [K, N] (+ bias [N]) (+ lora_scale * lora_in [M, r] @ lora_b^T [r, N])` -> `[M, N]`.

    `packed` and `quant_state` are a `Params4bit`'s data and state (check `supports` first); `x` is in the
    weight's compute dtype. `config` overrides `launch_config` (benchmarks sweep it).
    """
    rows, in_features = x.shape
    out_features = quant_state.shape[0]
    blocksize = quant_state.blocksize
    if x.stride(1) != 1:
        x = x.contiguous()
    config = config or launch_config(rows, out_features, in_features, blocksize, x.device)
    config = dict(config)
    block_m, block_n, split_k = config.pop("BLOCK_M"), config.pop("BLOCK_N"), config.pop("SPLIT_K")
    block_k = config.pop("BLOCK_K", max(DEFAULTS["BLOCK_K"], blocksize))
    config.setdefault("GATHER", DEFAULTS["GATHER"])
    config.setdefault("TRANSPOSED", DEFAULTS["TRANSPOSED"])
    if block_k % blocksize and blocksize % block_k:
        raise ValueError(f"BLOCK_K={block_k} and the blocksize {blocksize} must divide one another")
    steps = _steps_per_row(in_features, block_k)
    if split_k > steps:
        raise ValueError(f"SPLIT_K={split_k} is more than the {steps} loop steps of a row")
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m), split_k)
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    partial = x.new_empty(
        grid[0] * grid[1] * split_k * block_m * block_n if split_k > 1 else 1, dtype=torch.float32
    )
    counters = _counters(x.device, grid[0] * grid[1])
    nested = quant_state.nested
    state2 = quant_state.state2 if nested else quant_state
    rank = 0 if lora_in is None else lora_in.shape[1]
    if rank > MAX_LORA_RANK:
        raise ValueError(f"LoRA rank {rank} > {MAX_LORA_RANK} is not fused; apply it outside matmul_4bit")
    if lora_in is not None:
        lora_in, lora_b = lora_in.contiguous(), lora_b.contiguous()
    _matmul_4bit_kernel[grid](
        x, packed.reshape(-1).view(torch.int32), quant_state.absmax, quant_state.code,
        state2.absmax, state2.code, quant_state.offset if nested else quant_state.absmax,
        bias if bias is not None else y, lora_in if rank else y, lora_b if rank else y, float(lora_scale),
        partial, counters, y,
        rows, out_features, in_features, x.stride(0), lora_in.stride(0) if rank else 0, y.stride(0), rank,
        triton.cdiv(steps, split_k), split_k,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=state2.blocksize if nested else 1, NESTED=nested,
        HAS_BIAS=bias is not None, LORA_RANK=max(16, triton.next_power_of_2(rank)) if rank else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split_k > 1, **config,
    )  # fmt: skip
    return y
