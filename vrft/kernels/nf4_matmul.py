"""`y = x W^T + b (+ LoRA)` on a bitsandbytes 4-bit weight, read packed: no bf16 copy of `W` is ever written.

Why hand-written: bitsandbytes' own 4-bit matmul has a fused kernel for one input row only (its gemv); for
any other batch it dequantises the whole matrix to bf16 in memory and calls cuBLAS, so at the decode batches
of GRPO (8..64 rows) every step writes and re-reads 4 bytes per weight on top of the 0.5 it stores.

Storage, as `bitsandbytes.functional.quantize_4bit` writes it (0.4x-0.50; `dequantize_4bit` is the
reference this module is tested against): the `[N, K]` weight flattened row-major, two codes a byte; one
absmax per `blocksize` consecutive elements; a weight is `code[nibble] * absmax` computed in fp32 and rounded
to the compute dtype. With double quantisation the absmax is itself a uint8 code: `state2.code[q] *
state2.absmax[block // state2.blocksize] + offset`, in fp32.

The kernel: one program per (row tile of `x`, tile of `BLOCK_N` output features, slice of K). Each loop
step decodes `[BLOCK_N, BLOCK_K]` weights in registers (`nf4_decode`: the ways to turn nibbles into codes)
and makes tensor-core dots of them with the matching `x` columns, by default the weight tile as the left
operand (`y^T = W x^T`: the few decode rows are the MMA's narrow side). Two ways to apply the absmax:
- `SCALE_AFTER=0`: each weight is `code * absmax` in fp32 rounded once, exactly `dequantize_4bit`'s bf16
  weights (the training forward's); one dot per step. Costs an fp32 multiply and a conversion per weight.
- `SCALE_AFTER=1`: the codes alone, in the compute dtype; one dot per quantisation block into a fresh fp32
  sum, which the block's fp32 absmax then scales. A weight is then `bf16(code) * absmax` instead of
  `bf16(code * absmax)`: both are within one bf16 rounding of the exact product (tests/kernels derive the
  bound), not bit-equal to the training forward's weights.
The LoRA term `scale * (x A^T) B^T` (the engine computes `x A^T`, this kernel the rest) is added by the K
slices of each tile after their loops, 16 ranks each in turn, as tensor-core dots of the compute dtype
(nf4_epilogue). With a split K, partial sums go to an fp32 workspace and the last program of a tile to
arrive (an atomic counter, which that program resets, so CUDA-graph replays start from zero) adds them up,
then the bias, and writes `y` once. Weights that read the same input can share one launch
(`matmul_4bit_segments`: their tiles side by side, each program's weight found in a table).

Measured on the H200 at 16 rows (bench/rollout/results.md): the first variants (int32 words, shuffle
lookup, scale per weight) ran at 12-13% of the bandwidth bound on Qwen2-VL-7B's large projections, bound by
the per-weight decoding instructions; the byte-permute decode with the scale after the dot (`DEFAULTS`) runs
at 18-21%, as fast as cuBLAS on a bf16 copy of the same matrix, and still bound by decoding, not memory.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: supports() says why, reference_matmul still works
    triton = None

from vrft.kernels import nf4_mma
from vrft.kernels.launch_order import launch_options
from vrft.kernels.nf4_decode import DECODE_BYTES, DECODE_PRMT
from vrft.kernels.nf4_segments import Segments
from vrft.kernels.workspace import launch_outputs, multiprocessors

if triton is not None:
    from vrft.kernels.launch_order import wait_for_inputs
    from vrft.kernels.nf4_decode import absmax, code_books, decode
    from vrft.kernels.nf4_epilogue import lora_term, store_output
    from vrft.kernels.nf4_segments import segment

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256)  # one block per loop iteration: [BLOCK_N, blocksize / 2] bytes
DTYPES = (torch.bfloat16, torch.float16)
MAX_LORA_RANK = 256
# launch_config's choices, from `bench/rollout/kernel_sweep.py --sweep` on the H200 (2026-12-04, results in
# bench/rollout/results/kernel_sweep.json). At 16 rows the byte-permute decode with the scale applied after
# each block's dot took 149 us per 7B decoder layer against 218 for the first kernel's way (gate/up 34.8 us,
# cuBLAS on a bf16 copy 36.8); 8 warps, BLOCK_K 256 and BLOCK_N 256 all lost, and x as the left operand lost
# on every shape. At 8 and 32 rows it wins by the same or a smaller margin (147 / 200 us against 217 / 263).
DEFAULTS = {
    "BLOCK_N": 128,  # output features per program
    "BLOCK_K": 128,  # weights of each row decoded per loop step (at least one quantisation block)
    "GATHER": 1,  # code-book lookup for DECODE 0/1: 1 a register shuffle (tl.gather), 0 an L1-cached load
    "TRANSPOSED": 1,  # 1: the weight tile is the MMA's left operand (y^T = W x^T), 0: x is
    "DECODE": 2,  # nibbles to codes (nf4_decode): 0 int32 words, 1 uint8 bytes, 2 byte permutes (needs SCALE_AFTER)
    "SCALE_AFTER": 1,  # 0: code * absmax per weight (bnb's exact weights), 1: one dot per block, scaled after it
    "num_warps": 4,
    "num_stages": 2,
    "programs_per_sm": 8,  # the K split aims at this many programs per multiprocessor
}
# Above WIDE_ROWS rows the 64-row tile of x and the second accumulator of SCALE_AFTER no longer fit the
# registers of a 128-wide tile: at 64 rows the choices above took 404 us per layer, the first kernel's way
# (these overrides) 308 us, in the same sweep.
WIDE_ROWS = 32
WIDE_DEFAULTS = {"BLOCK_N": 64, "DECODE": 0, "SCALE_AFTER": 0, "num_stages": 3}
# Decode batches through nf4_mma's kernel (`_launch`): 126 us per 7B decoder layer against 155, a decode
# step of 5.9 ms against 7.0 on the H200 (bench/rollout/results.md). On by default; VRFT_NF4_MMA=0 in the
# environment sends every batch to this file's kernel instead (to compare them, or to rule the new one out).
MMA_SWITCH = "VRFT_NF4_MMA"
MMA_KERNEL = os.environ.get(MMA_SWITCH, "1") != "0"


def check_mma_switch() -> None:
    """Fail on a value of VRFT_NF4_MMA other than 0 or 1 (read as on): called before a model loads, where a
    run picks its rollout engine, rather than at import, which would end in a stack trace."""
    value = os.environ.get(MMA_SWITCH, "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"{MMA_SWITCH}={value!r} is neither 0 nor 1: set {MMA_SWITCH}=1 (decode batches through nf4_mma's "
            f"kernel, the default) or {MMA_SWITCH}=0 (every batch through nf4_matmul's), or unset it"
        )


KERNEL_SWITCHES = ("GATHER", "TRANSPOSED", "DECODE", "SCALE_AFTER", "num_warps", "num_stages")  # passed as is


def mma_unavailable(rows: int | None = None) -> str | None:
    """Why calls on `rows` rows (None: any number) would not go to `nf4_mma`'s kernel in this install, whatever
    the weight (None: they would; the weight's own checks are `mma_unsupported`'s)."""
    if not MMA_KERNEL:
        return f"{MMA_SWITCH}=0"
    return (rows is not None and nf4_mma.rows_unsupported(rows)) or nf4_mma.environment_unsupported()


def mma_unsupported(quant_state, x: Tensor) -> str | None:
    """Why a call on `x [rows, K]` does not go to `nf4_mma`'s kernel (None: it does)."""
    return mma_unavailable(x.shape[0]) or nf4_mma.unsupported(
        quant_state.quant_type, quant_state.blocksize, x.dtype, x.shape[1]
    )


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
        bias_ptr, lora_in_ptr, lora_b_ptr, lora_scale, partial_ptr, counter_ptr, y_ptr, segments_ptr,
        M, N, K, stride_xm, stride_lm, stride_ym, lora_rank, iters_per_split, split_k,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        HAS_BIAS: tl.constexpr, LORA_RANK: tl.constexpr, SEGMENTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        GATHER: tl.constexpr, TRANSPOSED: tl.constexpr, DECODE: tl.constexpr, SCALE_AFTER: tl.constexpr,
        EVEN: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)  # vrft.kernels.launch_order: the inputs an earlier kernel wrote are ready
        # Each loop step covers BLOCK_K columns of BLOCK_N weight rows, as PARTS dots of DOT_K columns: one
        # dot per step when every weight is scaled before it, one per quantisation block when scaled after.
        DTYPE: tl.constexpr = x_ptr.dtype.element_ty
        DOT_K: tl.constexpr = min(BLOCK_K, BLOCKSIZE) if SCALE_AFTER else BLOCK_K
        PARTS: tl.constexpr = BLOCK_K // DOT_K
        SCALES: tl.constexpr = max(1, DOT_K // BLOCKSIZE)  # absmax blocks per dot
        BOOK_DTYPE: tl.constexpr = DTYPE if SCALE_AFTER else tl.float32
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tile_n = pid_n
        if SEGMENTS > 0:  # several weights in one launch: this tile's weight, its rows local to that weight
            (
                packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, lora_in_ptr, lora_b_ptr,
                y_ptr, lora_rank, N, tile_n,
            ) = segment(
                segments_ptr, pid_n, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
                lora_in_ptr, lora_b_ptr, y_ptr, SEGMENTS, BLOCK_N,
            )  # fmt: skip
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # EVEN (N % BLOCK_N == 0 == K % BLOCK_K): the masks of weights, absmax and x columns fold away
        mask_m, mask_n = rows_m < M, (rows_n < N) | EVEN
        blocks_per_row = K // BLOCKSIZE
        row_blocks = rows_n * blocks_per_row  # [BLOCK_N] each row's first absmax (int32: N K / 64 < 2^31)
        x_rows = x_ptr + rows_m.to(tl.int64) * stride_xm
        book, tables = code_books(code_ptr, BLOCK_N, DECODE, GATHER, BOOK_DTYPE)
        offset = 0.0
        if NESTED:
            offset = tl.load(offset_ptr)
        if TRANSPOSED:  # y^T = W x^T: the decoded weight tile is the MMA's A operand, taken from registers
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * iters_per_split  # slices of whole steps; the last slice may be shorter
        for step in range(first, tl.minimum(first + iters_per_split, tl.cdiv(K, BLOCK_K))):
            for part in tl.static_range(PARTS):
                start = step * BLOCK_K + part * DOT_K  # first column of this dot
                value = decode(
                    packed_ptr, rows_n, mask_n, start, K, book, code_ptr, tables,
                    DOT_K, BLOCK_N, DECODE, GATHER, BOOK_DTYPE, EVEN, PTX,
                )  # fmt: skip
                block_in_row = start // BLOCKSIZE + tl.arange(0, SCALES)
                blocks = row_blocks[:, None] + block_in_row[None, :]  # [BLOCK_N, SCALES]
                mask_s = mask_n[:, None] & ((block_in_row < blocks_per_row) | EVEN)[None, :]
                scale = absmax(
                    absmax_ptr, absmax2_ptr, code2_ptr, offset, blocks, mask_s, NESTED, NESTED_BLOCKSIZE
                )
                if SCALE_AFTER:  # codes in the compute dtype; the block's fp32 absmax scales the dot's sum
                    weight = value
                else:  # code * absmax in fp32 rounded once, as dequantize_4bit: the training forward's weights
                    if SCALES > 1:
                        scale = tl.reshape(
                            tl.broadcast_to(scale[:, :, None], (BLOCK_N, SCALES, DOT_K // SCALES)),
                            (BLOCK_N, DOT_K),
                        )
                    weight = (value * scale).to(DTYPE)  # [BLOCK_N, DOT_K]
                column = start + tl.arange(0, DOT_K)
                mask_c = (column < K) | EVEN
                if TRANSPOSED:
                    x_part = tl.load(
                        x_rows[None, :] + column[:, None], mask=mask_m[None, :] & mask_c[:, None], other=0.0
                    )  # [DOT_K, BLOCK_M]
                    if SCALE_AFTER:
                        acc += tl.dot(weight, x_part) * tl.reshape(scale, (BLOCK_N, 1))
                    else:
                        acc = tl.dot(weight, x_part, acc)
                else:
                    x_part = tl.load(
                        x_rows[:, None] + column[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0
                    )  # [BLOCK_M, DOT_K]
                    if SCALE_AFTER:
                        acc += tl.dot(x_part, tl.trans(weight)) * tl.reshape(scale, (1, BLOCK_N))
                    else:
                        acc = tl.dot(x_part, tl.trans(weight), acc)
        if LORA_RANK > 0:  # the slices of the tile add the adapter's rank chunks (nf4_epilogue says why)
            acc = lora_term(
                acc, rows_m, rows_n, mask_m, mask_n, lora_in_ptr, lora_b_ptr, lora_scale, lora_rank,
                stride_lm, pid_k, split_k, DTYPE, LORA_RANK, TRANSPOSED,
            )  # fmt: skip
        if TRANSPOSED:
            acc = tl.trans(acc)

        store_output(
            acc, pid_m, pid_n, pid_k, rows_m, rows_n, mask_m, mask_n, partial_ptr, counter_ptr, split_k,
            bias_ptr, y_ptr, stride_ym, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS,
        )  # fmt: skip


def launch_config(
    rows: int, out_features: int, in_features: int, blocksize: int, device, **choices: int
) -> dict:
    """Tile sizes and K split for one call: enough programs to keep every multiprocessor streaming bytes.

    `choices` override `DEFAULTS` (with `WIDE_DEFAULTS` over `WIDE_ROWS` rows; the K split follows them);
    benchmarks sweep them.
    """
    chosen = {**DEFAULTS, **(WIDE_DEFAULTS if rows > WIDE_ROWS else {}), **choices}
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n, block_k = chosen["BLOCK_N"], max(chosen["BLOCK_K"], blocksize)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    steps = _steps_per_row(in_features, block_k)
    wanted = triton.cdiv(chosen["programs_per_sm"] * multiprocessors(device), tiles)
    split_k = min(wanted, max(steps // 2, 1), 32)  # slices of >= 2 steps; the last may be shorter (masked)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "SPLIT_K": split_k,
        **{key: chosen[key] for key in KERNEL_SWITCHES},
    }


def _steps_per_row(in_features: int, block_k: int) -> int:
    """Loop iterations over one weight row: `block_k` weights per iteration."""
    return triton.cdiv(in_features, block_k)


def matmul_4bit(
    x: Tensor,
    packed: Tensor,
    quant_state,
    bias: Tensor | None = None,
    lora_in: Tensor | None = None,
    lora_b: Tensor | None = None,
    lora_scale: float = 1.0,
    config: dict | None = None,
    x_ready: bool = False,
) -> Tensor:
    """`x [M, K] @ W^T [K, N] (+ bias [N]) (+ lora_scale * lora_in [M, r] @ lora_b^T [r, N])` -> `[M, N]`.

    `packed` and `quant_state` are a `Params4bit`'s data and state (check `supports` first); `x` is in the
    weight's compute dtype; `lora_in` and `lora_b` are rounded to it and their product summed in fp32, as
    autocast computes an adapter. `config` overrides `launch_config` (benchmarks sweep it). `x_ready`
    promises that the kernel launched last did not write `x` (`nf4_mma.launch` says what it buys).
    """
    rank = 0 if lora_in is None else lora_in.shape[1]
    if rank > MAX_LORA_RANK:
        raise ValueError(f"LoRA rank {rank} > {MAX_LORA_RANK} is not fused; apply it outside matmul_4bit")
    if lora_in is not None:
        lora_b = lora_b.contiguous()
    first = (packed, quant_state, bias, lora_b)
    return _launch(x, first, (quant_state.shape[0],), None, rank, lora_in, lora_scale, config, x_ready)


def matmul_4bit_segments(
    x: Tensor,
    group: Segments,
    lora_in: Tensor | None = None,
    lora_scale: float = 1.0,
    config: dict | None = None,
    x_ready: bool = False,
) -> Tensor:
    """`matmul_4bit` of `x` by each weight of `group`, their outputs side by side: `[M, sum of N]`.

    `lora_in` (with adapters) is the weights' shared `x A^T`, each reading the columns its table row names;
    all adapters have `lora_scale`. The outputs equal separate `matmul_4bit` calls with the same `config`
    (and `x_ready`).
    """
    if group.lora_rank > MAX_LORA_RANK:
        raise ValueError(f"LoRA rank {group.lora_rank} > {MAX_LORA_RANK} is not fused")
    return _launch(
        x, group.first, group.out_features, group.table, group.lora_rank, lora_in, lora_scale, config, x_ready
    )


def silu_pairs_unsupported(x: Tensor, group: Segments) -> str | None:
    """Why `matmul_4bit_silu` cannot take this call (None: it can): the gate and up weights of `group`,
    on `x [rows, K]`."""
    reason = nf4_mma.silu_pairs_unsupported(group.out_features, group.table, group.first[2])
    if reason is not None:
        return f"nf4_mma's launch {reason}"
    if not x.is_cuda:
        return "x is not on a CUDA device"
    return mma_unsupported(group.first[1], x)


def matmul_4bit_silu(
    x: Tensor, group: Segments, lora_in: Tensor | None = None, lora_scale: float = 1.0, x_ready: bool = False
) -> Tensor:
    """`silu(x W_gate^T) * (x W_up^T)` `[M, N]` in one launch of `nf4_mma`'s kernel, `group` the gate and up
    weights (with their adapters, as `matmul_4bit_segments`): the SiLU's own launch folded into the matmul's
    split-K epilogue (`nf4_mma._store_silu_pairs`). Bit for bit `decode_fusions.silu_mul` of the two halves
    of `matmul_4bit_segments`' output; `silu_pairs_unsupported` must be None."""
    reason = silu_pairs_unsupported(x, group)
    if reason is not None:
        raise ValueError(f"the SiLU cannot be folded into this launch: {reason}")
    if group.lora_rank > MAX_LORA_RANK:
        raise ValueError(f"LoRA rank {group.lora_rank} > {MAX_LORA_RANK} is not fused")
    return nf4_mma.launch(
        group.first, group.out_features, group.table, group.lora_rank, x, lora_in, lora_scale, None, x_ready,
        silu_pairs=True,
    )  # fmt: skip


def _launch(x, first, out_features, table, rank, lora_in, lora_scale, config, x_ready) -> Tensor:
    """One launch of the kernel over the weights `out_features` lists (several: their `table`).

    With `MMA_KERNEL` on and no `config`, calls that `nf4_mma` takes (CUDA, up to 32 rows, blocksize 64: the
    decode batches) go to its kernel, which measured faster; a `config` always means this one.
    """
    packed, quant_state, bias, lora_b = first
    rows, in_features = x.shape
    blocksize = quant_state.blocksize
    if config is None and x.is_cuda and mma_unsupported(quant_state, x) is None:
        return nf4_mma.launch(first, out_features, table, rank, x, lora_in, lora_scale, None, x_ready)
    if x.stride(1) != 1:
        x = x.contiguous()
    config = config or launch_config(rows, sum(out_features), in_features, blocksize, x.device)
    config = dict(config)
    block_m, block_n, split_k = config.pop("BLOCK_M"), config.pop("BLOCK_N"), config.pop("SPLIT_K")
    block_k = config.pop("BLOCK_K", max(DEFAULTS["BLOCK_K"], blocksize))
    for key in KERNEL_SWITCHES:
        config.setdefault(key, DEFAULTS[key])
    if block_k % blocksize and blocksize % block_k:
        raise ValueError(f"BLOCK_K={block_k} and the blocksize {blocksize} must divide one another")
    if config["DECODE"] == DECODE_PRMT and not config["SCALE_AFTER"]:
        raise ValueError(
            "DECODE=2 (byte permutes) decodes codes in the compute dtype only; set SCALE_AFTER=1"
        )
    steps = _steps_per_row(in_features, block_k)
    if split_k > steps:
        raise ValueError(f"SPLIT_K={split_k} is more than the {steps} loop steps of a row")
    grid = (sum(triton.cdiv(n, block_n) for n in out_features), triton.cdiv(rows, block_m), split_k)
    y, partial, counters = launch_outputs(x, sum(out_features), grid, block_m, block_n)
    nested = quant_state.nested
    state2 = quant_state.state2 if nested else quant_state
    if lora_in is not None and lora_in.stride(1) != 1:
        # Rows of `lora_in` may be strided (a column slice of a shared x A^T: vrft.rollout.packed); ranks not.
        lora_in = lora_in.contiguous()
    packed = packed.reshape(-1)
    _matmul_4bit_kernel[grid](
        x, packed if config["DECODE"] == DECODE_BYTES else packed.view(torch.int32), quant_state.absmax, quant_state.code,
        state2.absmax, state2.code, quant_state.offset if nested else quant_state.absmax,
        bias if bias is not None else y, lora_in if rank else y, lora_b if rank else y, float(lora_scale),
        partial, counters, y, table if table is not None else counters,
        rows, out_features[0], in_features, x.stride(0), lora_in.stride(0) if rank else 0, y.stride(0), rank,
        triton.cdiv(steps, split_k), split_k,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=state2.blocksize if nested else 1, NESTED=nested,
        HAS_BIAS=bias is not None, LORA_RANK=max(16, triton.next_power_of_2(rank)) if rank else 0,
        SEGMENTS=0 if table is None else len(out_features),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split_k > 1,
        # no masks needed on W, absmax, K
        EVEN=all(n % block_n == 0 for n in out_features) and in_features % block_k == 0,
        PTX=x.device.type == "cuda",  # CPU tensors run under the Triton interpreter, which has no inline PTX
        **config, **launch_options(x.device),
    )  # fmt: skip
    return y
