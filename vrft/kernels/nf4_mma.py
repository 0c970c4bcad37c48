"""`y = x W^T + b (+ LoRA)` on a bitsandbytes 4-bit weight at decode batches, operands in registers: Gluon.

Why another kernel: `nf4_matmul`'s Triton kernel spends most of its time waiting, not decoding or reading
(bench/rollout/results.md: ~20% of the bandwidth bound on the 7B projections while its main loop issues
~4.3 instructions per weight, which leave room for ~80%). Triton lays the decoded weight tile out as it
likes and then moves it through shared memory into the tensor cores' operand layout: per loop step the
packed codes go global -> shared -> registers, the decoded codes registers -> shared -> registers, the
absmax through shared memory too, with a barrier of the program's four warps at each of these hops.

Gluon (Triton's lower-level language, shipped with Triton >= 3.4) lets the kernel name its layouts. Here
each thread loads exactly the packed bytes whose codes its `mma.sync` fragment needs, so decoded codes are
already in the operand's registers and no code goes through shared memory: no barrier in the loop, each
warp streams its own rows. The trick is a permutation of K, applied to the weight tile and to `x` alike
(a dot product does not care in which order its terms come): the `m16n8k16` A fragment gives a thread the
columns `16 j + 8 h + 2 t + b` (`t` its lane's column group, `j`, `h`, `b` its registers), and the kernel
puts physical column `16 t + 8 j1 + 4 j0 + 2 h + b` there, so a thread's 16 weights of a row in one
64-column block are 16 consecutive codes: 8 consecutive bytes, one 8-byte load. The same permutation of
`x`'s columns is 16 consecutive bf16 per thread and row of `x`. The permutations are pure relabellings of
registers (reshape, permute and join of tensors whose layouts Triton then finds equal to the MMA's).

Decoding: `nf4_decode.PRMT_DECODE_PTX` (byte permutes over the code book as eight table words). Scaling:
one dot per 64-weight quantisation block into a fresh fp32 sum, scaled by the block's fp32 absmax
(`SCALE_AFTER` in `nf4_matmul`: a weight is `bf16(code) * absmax`, within one bf16 rounding of
`dequantize_4bit`'s; tests/kernels). The absmax of every block of a tile's K slice is worked out before the
loop into shared memory (`absmax_shared`, at most `SCALES_BYTES`); with `x_shared` (`MMA_DEFAULTS`), where
the kernel waits for `x` (no `x_ready`) and the tile has 16 rows, so is the
program's K slice of `x` (each warp then reads its x there rather than through L1). These are the only
shared memory the loop reads. The next loop step's codes are loaded before this step's are used in the
source, though ptxas issues those loads only ~4/5 into the step (sm_90 SASS); the `prefetch` variant pins
them to its top. `mma.sync` runs on sm_80 and later: the RTX 4090 (sm_89) too.

Measured on the H200 (bench/rollout/results.md, "A kernel without shared memory"): 130 us per 7B decoder
layer at 16 rows against `nf4_matmul`'s 154 (gate/up 31.6 against 35.6 us: 23% of the bandwidth bound, not
the 40% hoped for); 113.9 us with the absmax words and the slice's scales in shared memory since, and on
an H100 the engine's launches 94.1 us a layer with x's slice in shared memory against 99.9 (`MMA_DEFAULTS`
says where that holds and why it is off). Nsight
Compute: the barriers are gone and the issue rate rose (IPC 1.79 against 1.42), but with four programs per
multiprocessor the warps still wait most cycles (L1TEX loads, a third). Where the rest of the time goes:
bench/rollout/mma_anatomy.py.

Handles: blocksize 64 (bitsandbytes' default), NF4 / FP4, bf16 / fp16, nested or plain absmax, up to 32
rows of `x`, K a multiple of 64; the rest goes to `nf4_matmul`.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    # triton.jit functions that create no tensor of their own, so a Gluon kernel can call them
    from vrft.kernels.decode_fusions import silu_times
    from vrft.kernels.launch_order import wait_for_inputs
    from vrft.kernels.nf4_epilogue import finish_output
    from vrft.kernels.nf4_segments import segment
except ImportError:  # CPU-only installs, or a Triton without Gluon: `unsupported` says why
    gluon = None

from vrft.kernels.launch_order import launch_options
from vrft.kernels.nf4_decode import PRMT_DECODE_PTX
from vrft.kernels.workspace import launch_outputs, multiprocessors

BLOCKSIZE = 64
MAX_ROWS = 32
# The K permutation (module docstring), as the kernel applies it and tests/kernels/test_nf4_mma.py checks it:
# a word's eight codes joined in this nesting (element e = b + 2 h + 4 j0: j0 innermost, b outermost, so b
# ends up the fastest register bit as in the MMA operand), then the axes permuted as below.
CODE_JOINS = (((0, 4), (2, 6)), ((1, 5), (3, 7)))
# codes [n, block, t1, t0, j1, j0, h, b] -> [n, j1, j0, h, t1, t0, b, block]: operand column 32 j1 + 16 j0
# + 8 h + 4 t1 + 2 t0 + b, physical column 64 block + 32 t1 + 16 t0 + 8 j1 + 4 j0 + 2 h + b
CODES_PERMUTATION = (0, 4, 5, 6, 2, 3, 7, 1)
# x [block, t1, t0, j1, j0, h, b, m] -> [j1, j0, h, t1, t0, b, m, block]: the same columns
X_PERMUTATION = (3, 4, 5, 1, 2, 6, 7, 0)
# From bench/rollout/mma_sweep.py on the H200 (2026-12-05, results/mma_call/): at 16 rows 130.3 us per 7B
# decoder layer against nf4_matmul's 154.3 in the same run (gate/up 31.6 against 35.6 us, down 32.3 / 41.1);
# 128-row tiles 140-145, 256-row tiles 177-225.
MMA_DEFAULTS = {
    "BLOCK_N": 64,  # weight rows per program: 16 per warp and register repeat
    "BLOCKS": 4,  # 64-weight quantisation blocks per row per loop step (the codes loaded one step ahead)
    "num_warps": 4,
    "programs_per_sm": 8,  # the K split aims at this many programs per multiprocessor
    # a register cap (ptxas .maxnreg; None: none): 128 keeps four programs per multiprocessor where a
    # segments launch's table pointers took a 128-row tile to 147 registers (sm_90, no spills at 128)
    "maxnreg": 128,
    # The load variants below, timed by bench/rollout/mma_sweep.py on the H200 (results/mma_words_call/):
    # only the absmax words were faster (126.2 us a decoder layer against 129.9 at 16 rows); the prefetch
    # and clamped rows were slower, alone and with the words. The double-quantised absmax of a row's loop
    # step as one 32-bit word, loaded a step ahead (2 loads a row and step instead of 2 BLOCKS):
    "absmax_words": True,
    # an L2 prefetch of the codes this many steps ahead (0: none). It also pins the next step's
    # code loads to the top of the step, where ptxas otherwise sinks them ~4/5 of the way in (sm_90 SASS:
    # bench/rollout/mma_loads.py):
    "prefetch": 0,
    # rows past the weight's or x's end read the last row instead of taking masked loads, which cost a
    # predicate and the zeroing of each load's registers (60 of a step's 664 instructions, sm_90)
    "clamp_rows": False,
    # every scale of a tile's K slice worked out once before the K loop and kept in shared memory (at most
    # SCALES_BYTES), the loop reading two a block and thread, instead of the absmax words' loads and lookups
    # at each step (bench/rollout/mma_anatomy.py: the absmax cost 13% of the gate/up call, H100). Timed on
    # the H200 (results/absmax_shared_call/): 113.9 us per 7B decoder layer against 120.4, every projection
    # faster; where a slice's scales would not fit, the absmax words serve it:
    "absmax_shared": True,
    # the most bytes of shared memory that a program's K slice of x may take (0: x loaded at each step):
    # the slice loaded once before the K loop, the loop reading x there instead of through L1, where
    # bench/rollout/mma_anatomy.py found 6.5 of gate+up's 60 us lost on misses (H100); the K split rises
    # until the slice fits. Measured on the H100 (bench/rollout/results.md, "x's K slice in shared memory"):
    # the engine's four launches 99.9 -> 94.1 us a 7B layer alone; the gate/up chain of RMSNorm, x A^T and
    # the matmul 71.1 -> 65.0 us a layer, 53.5 -> 50.8 without the adapter; but where the caller promises
    # `x_ready` (the K loop already runs beside `lora_input`: every launch of the packed engine's decode
    # step with an adapter) 64.1 -> 62.7 in the chain and slower in the engine's step (5.27 ms against
    # 5.16, 5.41 / 5.42 against 5.35 / 5.34, 5.44 against 5.37 in three runs), so `launch` turns it off there,
    # and on 32-row tiles (over 16 rows), which no run timed with it. So it serves the decode steps without
    # an adapter (the base model's evaluation): bench/rollout/launch_overlap.py's gate/up chain without
    # LoRA, 1523.6 -> 1449.5 us for 28 layers (results/x_shared_overlap_call/, H100)
    "x_shared": 32768,
}
# the load variants off: the kernel as first timed, which the sweep and the tests measure them against
PLAIN_LOADS = {
    "absmax_words": False,
    "prefetch": 0,
    "clamp_rows": False,
    "absmax_shared": False,
    "x_shared": 0,
}


def unsupported(quant_type: str, blocksize: int, dtype: torch.dtype, in_features: int) -> str | None:
    """Why this kernel does not take a weight's calls (None: it does; the row count and the install are
    `rows_unsupported`'s and `environment_unsupported`'s); the caller then uses `nf4_matmul`'s."""
    if quant_type not in ("nf4", "fp4"):
        return f"quant_type {quant_type!r}"
    if blocksize != BLOCKSIZE:
        return f"blocksize {blocksize} (the kernel reads 64-weight blocks)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"compute dtype {dtype}"
    if in_features % BLOCKSIZE:
        return f"in_features {in_features} is not a multiple of 64"
    return None


def rows_unsupported(rows: int) -> str | None:
    """Why a call on `rows` rows (a decode batch's sequences) is too wide for this kernel (None: it is not)."""
    if rows > MAX_ROWS:
        return (
            f"decode batches of {rows} sequences (nf4_mma's kernel takes up to {MAX_ROWS}; wider ones go to "
            "nf4_matmul's)"
        )
    return None


def environment_unsupported() -> str | None:
    """Why no call goes to this kernel in this install (None: Gluon is there; the GPU is `nf4_matmul`'s
    check, as the kernel's `mma.sync` needs what its `tl.dot` does, compute capability 8.0)."""
    if gluon is None:
        return "this Triton has no Gluon (triton.experimental.gluon, Triton >= 3.4)"
    return None


@functools.cache
def layouts(block_n: int, block_m: int, blocks: int, warps: int):
    """The kernel's layouts: (mma, A operand, B operand, packed words [block_n, 8 blocks], x [64 blocks,
    block_m], sectors [block_n, 4]); words and x are the operands' layouts over physical columns (module
    docstring), sectors gives each thread of a row group one 32-byte sector of its rows (the L2 prefetch)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    operand_a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    operand_b = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    row_repeats = [[16 * warps * 2**i, 0] for i in range((block_n // (16 * warps)).bit_length() - 1)]
    block_bits = [[0, 8 * 2**i] for i in range(blocks.bit_length() - 1)]
    warp_rows = [[16 * 2**i, 0] for i in range(warps.bit_length() - 1)]
    words = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0], *row_repeats, *block_bits],  # two consecutive words (8 bytes) a row
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],  # lane = 4 g + t: row g, words 2 t, 2 t + 1
        warp_bases=warp_rows,
        block_bases=[],
        shape=[block_n, 8 * blocks],
    )
    m_repeats = [[0, 8 * 2**i] for i in range((block_m // 8).bit_length() - 1)]
    x_blocks = [[64 * 2**i, 0] for i in range(blocks.bit_length() - 1)]
    x = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0], *m_repeats, *x_blocks],  # 16 consecutive columns a row
        lane_bases=[[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0]] * (warps.bit_length() - 1),
        block_bases=[],
        shape=[64 * blocks, block_m],
    )
    sectors = gl.DistributedLinearLayout(
        reg_bases=[[8, 0], *row_repeats],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=warp_rows,
        block_bases=[],
        shape=[block_n, 4],
    )
    return mma, operand_a, operand_b, words, x, sectors


def _halves_ptx() -> str:
    """`PRMT_DECODE_PTX` with outputs `$0 .. $7` the eight 16-bit codes of a word in element order (its
    inputs move up to `$8 .. $16`), the four pairs kept as registers of the block."""
    body = re.sub(
        r"\$(\d+)",
        lambda found: f"pair{found.group(1)}" if int(found.group(1)) < 4 else f"${int(found.group(1)) + 4}",
        PRMT_DECODE_PTX,
    )
    inner = body.strip()[1:-1]  # the block's braces
    declare = ".reg .b32 pair0, pair1, pair2, pair3;"
    splits = "".join(f"\nmov.b32 {{${2 * i}, ${2 * i + 1}}}, pair{i};" for i in range(4))
    return "{\n" + declare + inner + splits + "\n}"


if gluon is not None:

    @gluon.jit
    def _permuted(t, ORDER: gl.constexpr):
        """`t`'s eight axes in the order `ORDER` (a tuple, as `CODES_PERMUTATION`)."""
        return gl.permute(t, ORDER[0], ORDER[1], ORDER[2], ORDER[3], ORDER[4], ORDER[5], ORDER[6], ORDER[7])

    @gluon.jit
    def _per_block(t, BLOCKS: gl.constexpr):
        """`t [.., BLOCKS]` -> the BLOCKS tensors `t[.., b]` (a tuple), by splitting the last axis."""
        if BLOCKS == 1:
            return (gl.reshape(t, t.shape[:-1]),)
        elif BLOCKS == 2:
            return gl.split(t)
        else:  # 4: the last axis as (high bit, low bit); split takes the low bit first
            halves = gl.reshape(t, t.shape[:-1] + [2, 2])
            even, odd = gl.split(halves)
            first, third = gl.split(even)
            second, fourth = gl.split(odd)
            return first, second, third, fourth

    @gluon.jit
    def _decode(words, tables, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr, DTYPE: gl.constexpr):
        """Packed words `[BLOCK_N, 8 BLOCKS]` -> per block the codes `[BLOCK_N, 64]`, columns in the kernel's K
        order (module docstring), in a layout equal to the A operand's up to register order."""
        c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
            HALVES_PTX,
            HALVES_CONSTRAINTS,
            [words, tables[0], tables[1], tables[2], tables[3], tables[4], tables[5], tables[6], tables[7]],
            dtype=(gl.int16,) * 8,
            is_pure=True,
            pack=1,
        )
        # code c_e is element e = b + 2 h + 4 j0 of its word. Joined with j0 first and b last, so that b is
        # the fastest register bit as in the MMA operand and each pair of codes stays one 32-bit register
        # (joined the other way round, ptxas spent ~0.7 byte permutes per weight re-pairing 16-bit halves).
        codes = gl.join(
            gl.join(gl.join(c0, c4), gl.join(c2, c6)),  # b = 0: [.., j0, h]
            gl.join(gl.join(c1, c5), gl.join(c3, c7)),  # b = 1; CODE_JOINS
        ).to(DTYPE, bitcast=True)  # [BLOCK_N, 8 BLOCKS, j0, h, b]
        # word = 8 block + 4 t1 + 2 t0 + j1 -> [n, block, t1, t0, j1, j0, h, b]
        codes = gl.reshape(codes, [BLOCK_N, BLOCKS, 2, 2, 2, 2, 2, 2])
        # the operand's column 32 j1 + 16 j0 + 8 h + 4 t1 + 2 t0 + b, the block last
        codes = _permuted(codes, CODES_PERMUTATION_C)
        codes = gl.reshape(codes, [BLOCK_N, 64, BLOCKS])
        return _per_block(codes, BLOCKS)

    @gluon.jit
    def _x_operands(x, BLOCK_M: gl.constexpr, BLOCKS: gl.constexpr, B: gl.constexpr):
        """`x [64 BLOCKS, BLOCK_M]` (physical columns down) -> per block the B operand `[64, BLOCK_M]`."""
        # column = 64 block + 32 t1 + 16 t0 + 8 j1 + 4 j0 + 2 h + b
        x = gl.reshape(x, [BLOCKS, 2, 2, 2, 2, 2, 2, BLOCK_M])
        x = _permuted(x, X_PERMUTATION_C)
        x = gl.reshape(x, [64, BLOCK_M, BLOCKS])
        return _per_block(x, BLOCKS)

    @gluon.jit
    def _byte_tables(code_ptr, DTYPE: gl.constexpr, WARPS: gl.constexpr):
        """The code book in `DTYPE` as `PRMT_DECODE_PTX`'s eight table words: high bytes of entries 0-3 ..
        12-15, then their low bytes. Made by reductions, so each thread holds them in ordinary registers:
        loaded as scalars they sat in uniform registers, and ptxas copied one into an ordinary register
        for every byte permute that read it (~1 instruction per weight, sm_90)."""
        entry = gl.arange(0, 16, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
        bits = gl.load(code_ptr + entry).to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        high = (bits >> 8) << (8 * (entry % 4))
        low = (bits & 0xFF) << (8 * (entry % 4))
        word = entry // 4
        return (
            gl.sum(gl.where(word == 0, high, 0), axis=0), gl.sum(gl.where(word == 1, high, 0), axis=0),
            gl.sum(gl.where(word == 2, high, 0), axis=0), gl.sum(gl.where(word == 3, high, 0), axis=0),
            gl.sum(gl.where(word == 0, low, 0), axis=0), gl.sum(gl.where(word == 1, low, 0), axis=0),
            gl.sum(gl.where(word == 2, low, 0), axis=0), gl.sum(gl.where(word == 3, low, 0), axis=0),
        )  # fmt: skip

    @gluon.jit
    def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, mask,
                NESTED: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr):  # fmt: skip
        """fp32 absmax of quantisation blocks `block`, as `dequantize_4bit` computes it."""
        if NESTED:  # code2[q] * absmax2[block // nested blocksize] + offset, in fp32
            quantised = _load(absmax_ptr + block, mask, 0).to(gl.int32)
            scale2 = _load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask, 0.0)
            scale = gl.load(code2_ptr + quantised) * scale2 + offset
        else:
            scale = _load(absmax_ptr + block, mask, 0.0)
        return scale

    @gluon.jit
    def _load(pointers, mask, other):
        """`gl.load(pointers, mask=mask, other=other)`, or unmasked where `mask` is None (CLAMP_ROWS)."""
        if mask is None:
            return gl.load(pointers)
        else:
            return gl.load(pointers, mask=mask, other=other)

    @gluon.jit
    def _mma_4bit_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
        lora_in_ptr, lora_b_ptr, lora_scale, partial_ptr, counter_ptr, y_ptr, segments_ptr,
        M, N, K, stride_xm, stride_lm, stride_ym, lora_rank, iters_per_split, split_k,
        NESTED: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, HAS_BIAS: gl.constexpr,
        LORA_RANK: gl.constexpr, SEGMENTS: gl.constexpr, SILU_PAIRS: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
        ABSMAX_WORDS: gl.constexpr, PREFETCH: gl.constexpr, CLAMP_ROWS: gl.constexpr,
        SLICE_BLOCKS: gl.constexpr, SCALES: gl.constexpr, SCALES_SHARED: gl.constexpr,
        X_STEPS: gl.constexpr, XP: gl.constexpr, X_SHARED: gl.constexpr,
        MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, WORDS: gl.constexpr, XL: gl.constexpr,
        SECTORS: gl.constexpr, PDL: gl.constexpr, X_READY: gl.constexpr,
    ):  # fmt: skip
        DTYPE: gl.constexpr = x_ptr.dtype.element_ty
        STEP: gl.constexpr = 64 * BLOCKS  # columns per loop step
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        tile_n = pid_n
        if SEGMENTS > 0:  # several weights in one launch: this tile's weight, its rows local to that weight
            # (the outputs' pointers it also returns are read again after the loop: held through it they cost
            # ~20 registers; these loads, unused, are dropped)
            packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, _, _, _, _, _, N, tile_n = segment(
                segments_ptr, pid_n, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
                lora_in_ptr, lora_b_ptr, y_ptr, SEGMENTS, BLOCK_N,
            )  # fmt: skip
        # the packed words of this tile's rows, one step's worth: [BLOCK_N, 8 BLOCKS]
        rows_w = tile_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS))
        words_w = gl.arange(0, 8 * BLOCKS, layout=gl.SliceLayout(0, WORDS))
        if CLAMP_ROWS:  # rows past the end read the last row (their sums are never stored): unmasked loads,
            # whose registers need no zeroing first (`_load`)
            rows_w = gl.minimum(rows_w, N - 1)
            mask_w = None
        else:
            mask_w = (rows_w < N)[:, None]
        word_ptrs = packed_ptr + (rows_w.to(gl.int64) * (K // 8))[:, None] + words_w[None, :]
        # x's rows, one step's columns: [STEP, BLOCK_M]
        columns_x = gl.arange(0, STEP, layout=gl.SliceLayout(1, XL))
        rows_x = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XL))
        if CLAMP_ROWS:
            rows_x = gl.minimum(rows_x, M - 1)
            mask_x = None
        else:
            mask_x = (rows_x < M)[None, :]
        x_ptrs = x_ptr + (rows_x.to(gl.int64) * stride_xm)[None, :] + columns_x[:, None]
        # the absmax rows, in the accumulator's layout
        rows_s = tile_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        blocks_per_row = K // 64
        if CLAMP_ROWS:
            row_blocks = gl.minimum(rows_s, N - 1) * blocks_per_row
            mask_s = None
        else:
            row_blocks = rows_s * blocks_per_row
            mask_s = rows_s < N
        offset = 0.0
        if NESTED:
            offset = gl.load(offset_ptr)
        tables = _byte_tables(code_ptr, DTYPE, gl.num_warps())
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        first = pid_k * iters_per_split
        last = gl.minimum(first + iters_per_split, K // STEP)
        # Each step loads the codes of the step after it before decoding its own, so that a step's loads can
        # be in flight while the step before is decoded and multiplied (ptxas moves them late unless PREFETCH
        # pins them); the last step loads itself again rather than taking a predicate. (Two steps an
        # iteration, which saves the register copy of the words, and a cp.async ring of shared-memory slots
        # were slower: bench/rollout/results.md.)
        words_next = _load(word_ptrs + first * (8 * BLOCKS), mask_w, 0)
        scales = 0  # SLICE_BLOCKS only
        if SLICE_BLOCKS > 0:  # every scale of the tile's K slice, worked out once, kept in shared memory
            scales = _slice_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, tile_n, N, blocks_per_row, first,
                                   last, NESTED, NESTED_BLOCKSIZE, BLOCK_N, BLOCKS, SLICE_BLOCKS, SCALES,
                                   SCALES_SHARED)  # fmt: skip
        elif ABSMAX_WORDS:  # the step's absmax bytes as one word a row, loaded a step ahead as the codes are
            absmax_next = _absmax_word(absmax_ptr, absmax2_ptr, row_blocks + first * BLOCKS, mask_s,
                                       NESTED_BLOCKSIZE)  # fmt: skip
        if PREFETCH > 0:
            sector_ptrs = _sector_pointers(packed_ptr, tile_n, N, K, BLOCK_N, BLOCKS, SECTORS)
        # Everything above read only what no kernel of the decode step writes (the weights, their absmax and
        # code books, the segment table); x, the LoRA input and the outputs wait for the kernel before
        # (vrft.kernels.launch_order), while the first codes are on their way from memory. With X_READY (x's
        # writer finished before the kernel just before this one launched: `launch`), only the LoRA input
        # and the outputs wait, and the whole K loop runs while that kernel (lora_input) still works.
        if not X_READY:
            wait_for_inputs(PDL)
        xs = 0  # X_STEPS only
        if X_STEPS > 0:  # the slice of x, loaded once
            xs = _slice_x(
                x_ptr, pid_m, M, stride_xm, first, last, DTYPE, STEP, BLOCK_M, X_STEPS, XP, X_SHARED
            )
        for step in range(first, last):
            words = words_next
            ahead = gl.minimum(step + 1, last - 1)
            words_next = _load(word_ptrs + ahead * (8 * BLOCKS), mask_w, 0)
            absmax_word, scale2 = 0, 0.0  # the absmax words' path only
            if ABSMAX_WORDS and SLICE_BLOCKS == 0:
                absmax_word, scale2 = absmax_next
                absmax_next = _absmax_word(absmax_ptr, absmax2_ptr, row_blocks + ahead * BLOCKS, mask_s,
                                           NESTED_BLOCKSIZE)  # fmt: skip
            if PREFETCH > 0:
                _prefetch_l2(sector_ptrs + gl.minimum(step + PREFETCH, last - 1) * (8 * BLOCKS))
            acc = _step(acc, words, step, x_ptrs, mask_x, xs, code2_ptr, absmax_ptr, absmax2_ptr, offset,
                        row_blocks, mask_s, absmax_word, scale2, scales, step - first, tables, BLOCK_N, BLOCK_M,
                        BLOCKS, NESTED, NESTED_BLOCKSIZE, ABSMAX_WORDS, SLICE_BLOCKS, X_STEPS, DTYPE, MMA, XL, A,
                        B)  # fmt: skip
        if X_READY:
            wait_for_inputs(PDL)
        if SEGMENTS > 0:  # the outputs' pointers, read only now
            _, _, _, _, _, bias_ptr, lora_in_ptr, lora_b_ptr, y_segment, lora_rank, _, _ = segment(
                segments_ptr, pid_n, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
                lora_in_ptr, lora_b_ptr, y_ptr, SEGMENTS, BLOCK_N,
            )  # fmt: skip
            if not SILU_PAIRS:  # (paired, the two weights write one output from its first column)
                y_ptr = y_segment
        if LORA_RANK > 0:
            acc = _lora_term(acc, pid_m, pid_k, split_k, rows_s, M, N, lora_in_ptr, lora_b_ptr, lora_scale,
                             lora_rank, stride_lm, DTYPE, BLOCK_M, BLOCK_N, MMA, A, B)  # fmt: skip
        if SILU_PAIRS:
            _store_silu_pairs(acc, pid_n, pid_m, pid_k, tile_n, M, N, partial_ptr, counter_ptr, split_k, y_ptr,
                              stride_ym, BLOCK_M, BLOCK_N, MMA)  # fmt: skip
        else:
            _store(acc, pid_n, pid_m, pid_k, tile_n, M, N, partial_ptr, counter_ptr, split_k, bias_ptr, y_ptr,
                   stride_ym, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS, MMA)  # fmt: skip

    @gluon.jit
    def _step(acc, words, step, x_ptrs, mask_x, xs, code2_ptr, absmax_ptr, absmax2_ptr, offset, row_blocks,
              mask_s, absmax_word, scale2, scales, local_step, tables, BLOCK_N: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCKS: gl.constexpr, NESTED: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr,
              ABSMAX_WORDS: gl.constexpr, SLICE_BLOCKS: gl.constexpr, X_STEPS: gl.constexpr,
              DTYPE: gl.constexpr, MMA: gl.constexpr, XL: gl.constexpr, A: gl.constexpr,
              B: gl.constexpr):  # fmt: skip
        """`acc` plus the products of loop step `step`: `words` its packed codes, BLOCKS blocks of 64 columns
        (with SLICE_BLOCKS, `scales` the K slice's scales in shared memory and `local_step` the step's place
        in the slice: `_slice_scales`; else with ABSMAX_WORDS, `absmax_word` and `scale2` its absmax loads:
        `_absmax_word`; with X_STEPS, `xs` the slice's x in shared memory: `_slice_x`)."""
        if X_STEPS > 0:
            x = xs.index(local_step).load(XL)
        else:
            # x is read by every program (L2) and every warp (L1): loaded where it is used, not a step ahead,
            # whose register copies at the loop's end cost ~0.5 byte permutes per weight
            x = _load(x_ptrs + step * (64 * BLOCKS), mask_x, 0.0)
        codes = _decode(words, tables, BLOCK_N, BLOCKS, DTYPE)
        operands = _x_operands(x, BLOCK_M, BLOCKS, B)
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        first_block = row_blocks + step * BLOCKS
        for block in gl.static_range(BLOCKS):
            if SLICE_BLOCKS > 0:
                scale = scales.index(local_step * BLOCKS + block).load(gl.SliceLayout(1, MMA))
            elif ABSMAX_WORDS:  # the block's byte of the word (little-endian), its code, the shared scale2
                quantised = (absmax_word >> ((first_block % 4 + block) * 8)) & 0xFF
                scale = gl.load(code2_ptr + quantised) * scale2 + offset
            else:
                scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, first_block + block, mask_s,
                                NESTED, NESTED_BLOCKSIZE)  # fmt: skip
            a = gl.convert_layout(codes[block], A)
            b = gl.convert_layout(operands[block], B)
            acc += mma_v2(a, b, zero) * scale[:, None]
        return acc

    @gluon.jit
    def _slice_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, tile_n, N, blocks_per_row, first, last,
                      NESTED: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCKS: gl.constexpr, SLICE_BLOCKS: gl.constexpr, SCALES: gl.constexpr,
                      SCALES_SHARED: gl.constexpr):  # fmt: skip
        """The fp32 absmax of every block of the tile's K slice (steps `first .. last`), `[SLICE_BLOCKS,
        BLOCK_N]` in shared memory, block-major so that a step reads a block's scales of its rows as one
        row: worked out before the K loop by all the program's threads, where the loop otherwise loads,
        looks up and waits for them at every step."""
        slice_blocks = first * BLOCKS + gl.arange(0, SLICE_BLOCKS, layout=gl.SliceLayout(1, SCALES))
        rows = tile_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, SCALES))
        mask = (slice_blocks < last * BLOCKS)[:, None] & (rows < N)[None, :]
        blocks = (rows.to(gl.int64) * blocks_per_row)[None, :] + slice_blocks[:, None]
        table = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, blocks, mask, NESTED, NESTED_BLOCKSIZE)
        scales = gl.allocate_shared_memory(gl.float32, [SLICE_BLOCKS, BLOCK_N], SCALES_SHARED, table)
        # Written once: one barrier here, where the compiler would put one before the first read, inside the
        # loop, at every step. The rows are then read one at a time, through a view whose layout is a row's.
        gl.thread_barrier()
        return scales._reinterpret(gl.float32, [SLICE_BLOCKS, BLOCK_N], SCALE_ROW_SHARED)

    @gluon.jit
    def _slice_x(x_ptr, pid_m, M, stride_xm, first, last, DTYPE: gl.constexpr, STEP: gl.constexpr,
                 BLOCK_M: gl.constexpr, X_STEPS: gl.constexpr, XP: gl.constexpr,
                 X_SHARED: gl.constexpr):  # fmt: skip
        """x's rows of the program's K slice (steps `first .. last`, zeros past them and past x's rows) in
        shared memory, `[X_STEPS, STEP, BLOCK_M]`: loaded by all of the program's warps before the K loop,
        all loads in flight at once, where the loop otherwise loads each step's x in every warp through L1."""
        columns = gl.arange(0, STEP, layout=gl.SliceLayout(1, XP))
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XP))
        pointers = x_ptr + (rows.to(gl.int64) * stride_xm)[None, :] + (first * STEP + columns)[:, None]
        in_rows = (rows < M)[None, :]
        xs = gl.allocate_shared_memory(DTYPE, [X_STEPS, STEP, BLOCK_M], X_SHARED)
        for local in gl.static_range(X_STEPS):
            xs.index(local).store(
                gl.load(pointers + local * STEP, mask=in_rows & (first + local < last), other=0.0)
            )
        gl.thread_barrier()  # as `_slice_scales`: one barrier here, none in the loop
        return xs

    @gluon.jit
    def _absmax_word(absmax_ptr, absmax2_ptr, first_block, mask, NESTED_BLOCKSIZE: gl.constexpr):
        """The aligned 32-bit word holding the quantised absmax bytes of blocks `first_block .. + BLOCKS` of
        each row, and their second-level scale: one load each where `_absmax` makes two a block. (A row's
        blocks of one step share a word and a second-level block: `launch` checks that BLOCKS divides 4 and
        the nested blocksize, and K whole steps makes it divide the row's blocks.)"""
        words = absmax_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        word = _load(words + first_block // 4, mask, 0)
        scale2 = _load(absmax2_ptr + first_block // NESTED_BLOCKSIZE, mask, 0.0)
        return word, scale2

    @gluon.jit
    def _sector_pointers(packed_ptr, tile_n, N, K, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr,
                         SECTORS: gl.constexpr):  # fmt: skip
        """`[BLOCK_N, 4]` addresses of the 32-byte sectors of each row's first loop step (one a block: with
        fewer than four blocks a step, some asked for twice), in a layout that gives each thread of a row
        group one sector: the L2 prefetch's targets, step by step."""
        rows = tile_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SECTORS))
        rows = gl.minimum(rows, N - 1)  # rows past the weight's end prefetch its last row, in bounds
        sectors = gl.arange(0, 4, layout=gl.SliceLayout(0, SECTORS))
        return packed_ptr + (rows.to(gl.int64) * (K // 8))[:, None] + (8 * (sectors % BLOCKS))[None, :]

    @gluon.jit
    def _prefetch_l2(pointers):
        """Ask L2 for the sectors at `pointers` (no register waits for them: the loads that read them later
        find them in L2 instead of DRAM)."""
        gl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\nmov.u32 $0, 0;",
            "=r,l",
            [pointers],
            dtype=gl.int32,
            is_pure=False,
            pack=1,
        )

    @gluon.jit
    def _lora_term(acc, pid_m, pid_k, split_k, rows_n, M, N, lora_in_ptr, lora_b_ptr, lora_scale, lora_rank,
                   stride_lm, DTYPE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr):  # fmt: skip
        """`acc` plus this K slice's share of `scale * (x A^T) B^T`, as `nf4_epilogue.lora_term`: 16 ranks a
        dot, the chunks dealt out over the tile's slices from the last one backwards; both operands rounded
        to the compute dtype, summed in fp32. Loaded straight into the MMA's operand layouts (once a tile)."""
        rows_b = gl.convert_layout(rows_n, gl.SliceLayout(1, A))
        ranks_b = gl.arange(0, 16, layout=gl.SliceLayout(0, A))
        ranks_x = gl.arange(0, 16, layout=gl.SliceLayout(1, B))
        rows_x = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, B))
        mask_b = (rows_b < N)[:, None]
        mask_x = (rows_x < M)[None, :]
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        for start in range(16 * (split_k - 1 - pid_k), lora_rank, 16 * split_k):
            in_rank_b = (start + ranks_b < lora_rank)[None, :]
            b = gl.load(lora_b_ptr + (rows_b * lora_rank)[:, None] + (start + ranks_b)[None, :],
                        mask=mask_b & in_rank_b, other=0.0).to(DTYPE)  # fmt: skip
            in_rank_x = (start + ranks_x < lora_rank)[:, None]
            xa = gl.load(lora_in_ptr + (rows_x.to(gl.int64) * stride_lm)[None, :] + (start + ranks_x)[:, None],
                         mask=mask_x & in_rank_x, other=0.0).to(DTYPE)  # fmt: skip
            acc += lora_scale * mma_v2(b, xa, zero)
        return acc

    @gluon.jit
    def _tile_offsets(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MMA: gl.constexpr):
        """Each accumulator element's offset in a tile's `[BLOCK_N, BLOCK_M]` slot of the split-K workspace."""
        return (
            gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))[:, None] * BLOCK_M
            + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))[None, :]
        )

    @gluon.jit
    def _arrive(acc, slot_ptrs, counter_ptr):
        """Store this K slice's sums at `slot_ptrs` and count its arrival at `counter_ptr`; returns the count
        before it (the arrival that sees the number of slices sharing the counter, less one, is the last: it
        adds them up)."""
        gl.store(slot_ptrs, acc)
        gl.thread_barrier()  # every thread's partial is written before the release below
        return gl.atomic_add(counter_ptr, 1, sem="acq_rel")

    @gluon.jit
    def _slices_sum(slot_ptrs, split_k, TILE: gl.constexpr, acc):
        """The sum of a tile's `split_k` slices from its first slice's `slot_ptrs` (read past L1: other
        programs wrote them), in slice order, shaped and laid out as `acc`."""
        total = gl.zeros_like(acc)
        for split in range(split_k):
            total += gl.load(slot_ptrs + split * TILE, cache_modifier=".cg")
        return total

    @gluon.jit
    def _store(acc, pid_n, pid_m, pid_k, tile_n, M, N, partial_ptr, counter_ptr, split_k, bias_ptr, y_ptr,
               stride_ym, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT: gl.constexpr,
               HAS_BIAS: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
        """`y[rows_m, rows_n] = (sum over K slices of acc [BLOCK_N, BLOCK_M])^T (+ bias)`, as
        `nf4_epilogue.store_output`: the last slice of a tile to arrive adds the partials up."""
        if SPLIT:
            TILE: gl.constexpr = BLOCK_M * BLOCK_N
            tile = pid_m * gl.num_programs(0) + pid_n
            slots = partial_ptr + tile.to(gl.int64) * (split_k * TILE) + _tile_offsets(BLOCK_M, BLOCK_N, MMA)
            arrived = _arrive(acc, slots + pid_k * TILE, counter_ptr + tile)
            if arrived == split_k - 1:
                total = _slices_sum(slots, split_k, TILE, acc)
                gl.atomic_xchg(counter_ptr + tile, 0)
                _finish(total, pid_m, tile_n, M, N, bias_ptr, y_ptr, stride_ym, BLOCK_M, BLOCK_N, HAS_BIAS)
        else:
            _finish(acc, pid_m, tile_n, M, N, bias_ptr, y_ptr, stride_ym, BLOCK_M, BLOCK_N, HAS_BIAS)

    @gluon.jit
    def _store_silu_pairs(acc, pid_n, pid_m, pid_k, tile_n, M, N, partial_ptr, counter_ptr, split_k, y_ptr,
                          stride_ym, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
        """`y[rows_m, rows_n] = silu(gate) * up` of a launch over two weights of one shape, gate then up
        (`launch`'s `silu_pairs`): as `_store`, the K slices' sums go through the workspace (even unsplit),
        but one counter serves gate tile `tile_n` and up tile `tile_n` together, and the last of their
        2 `split_k` slices to arrive adds up both, rounds each to the output dtype as `_store` would, and
        writes `decode_fusions.silu_times` of the two: the SiLU launch's work, without its launch."""
        tiles = gl.num_programs(0)
        half = tiles // 2  # the gate's tiles, then the up's
        local = _tile_offsets(BLOCK_M, BLOCK_N, MMA)
        TILE: gl.constexpr = BLOCK_M * BLOCK_N
        own = (pid_m * tiles + pid_n).to(gl.int64) * split_k + pid_k
        pair = pid_m * half + tile_n
        arrived = _arrive(acc, partial_ptr + own * TILE + local, counter_ptr + pair)
        if arrived == 2 * split_k - 1:
            gates = partial_ptr + (pid_m * tiles + tile_n).to(gl.int64) * split_k * TILE + local
            gate = _slices_sum(gates, split_k, TILE, acc)
            up = _slices_sum(gates + half * split_k * TILE, split_k, TILE, acc)
            gl.atomic_xchg(counter_ptr + pair, 0)
            DTYPE: gl.constexpr = y_ptr.dtype.element_ty
            product = silu_times(gate.to(DTYPE), up.to(DTYPE), True)
            # finish_output rounds to y's dtype again: a 16-bit value is itself there
            _finish(
                product.to(gl.float32), pid_m, tile_n, M, N, y_ptr, y_ptr, stride_ym, BLOCK_M, BLOCK_N, False
            )

    @gluon.jit
    def _finish(acc, pid_m, tile_n, M, N, bias_ptr, y_ptr, stride_ym, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
        """`nf4_epilogue.finish_output` of `acc [BLOCK_N, BLOCK_M]` turned round (a relabelling of registers)."""
        acc = gl.permute(acc, 1, 0)  # [BLOCK_M, BLOCK_N]
        rows_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc.type.layout))
        rows_n = tile_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc.type.layout))
        finish_output(acc, rows_m, rows_n, rows_m < M, rows_n < N, bias_ptr, y_ptr, stride_ym, HAS_BIAS)

    # PRMT_DECODE_PTX with its four pairs handed out as eight 16-bit codes: split as int32 pairs in Triton
    # and joined again for the MMA, ptxas spent ~0.4 byte permutes per weight putting each pair back together
    HALVES_PTX = gl.constexpr(_halves_ptx())
    CODES_PERMUTATION_C = gl.constexpr(CODES_PERMUTATION)
    X_PERMUTATION_C = gl.constexpr(X_PERMUTATION)
    # `_slice_scales`' buffer as rows: the same row-major bytes, the leading axis an index
    SCALE_ROW_SHARED = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [0]))
    HALVES_CONSTRAINTS = gl.constexpr(",".join(["=h"] * 8 + ["r"] * 9))


def launch_config(rows: int, out_features: int, in_features: int, device: torch.device, **choices) -> dict:
    """Tiles and K split for one call (`MMA_DEFAULTS` overridden by `choices`): enough programs that each
    multiprocessor holds about `programs_per_sm`, each K slice whole loop steps."""
    chosen = {**MMA_DEFAULTS, **choices}
    blocks = chosen["BLOCKS"]
    while in_features % (64 * blocks):
        blocks //= 2
    block_m = 16 if rows <= 16 else 32
    tiles = triton.cdiv(out_features, chosen["BLOCK_N"]) * triton.cdiv(rows, block_m)
    steps = in_features // (64 * blocks)
    wanted = triton.cdiv(chosen["programs_per_sm"] * multiprocessors(device), tiles)
    split_k = max(1, min(wanted, steps // 2, 64))
    while chosen["x_shared"] and x_slice_bytes(steps, split_k, blocks, block_m) > chosen["x_shared"]:
        split_k += 1  # until the slice of x fits (at one step a slice it always does)
    split_k = triton.cdiv(steps, triton.cdiv(steps, split_k))  # no empty slice: each reads its first step
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": chosen["BLOCK_N"],
        "BLOCKS": blocks,
        "SPLIT_K": split_k,
        "num_warps": chosen["num_warps"],
        "maxnreg": chosen["maxnreg"],
        "absmax_words": chosen["absmax_words"],
        "prefetch": chosen["prefetch"],
        "clamp_rows": chosen["clamp_rows"],
        "absmax_shared": chosen["absmax_shared"],
        "x_shared": chosen["x_shared"],
    }


def silu_pairs_unsupported(out_features, table, bias) -> str | None:
    """Why a launch over the weights `out_features` lists cannot write `silu(gate) * up` (`launch`'s
    `silu_pairs`), or None: it takes two weights of one shape in one segment table, without bias."""
    if table is None or len(out_features) != 2 or len(set(out_features)) != 1 or bias is not None:
        return (
            f"takes two weights of one shape without bias (a gate and an up projection), not out_features "
            f"{tuple(out_features)}{' with a bias' if bias is not None else ''}"
        )
    return None


def matmul_4bit_mma(
    x: Tensor, packed: Tensor, quant_state, bias: Tensor | None = None, config: dict | None = None
):
    """`x [M, K] @ W^T (+ bias)` -> `[M, N]` by this kernel alone (benchmarks and tests; `nf4_matmul`'s entry
    points route here where `unsupported` allows)."""
    return launch((packed, quant_state, bias, None), (quant_state.shape[0],), None, 0, x, None, 1.0, config)


def launch(first, out_features, table, rank, x, lora_in, lora_scale, config, x_ready: bool = False,
           silu_pairs: bool = False) -> Tensor:  # fmt: skip
    """One launch over the weights `out_features` lists (several: their segment `table`), as
    `nf4_matmul._launch` takes them: `first` the first weight's `(packed, quant_state, bias, lora_b)`.

    `x_ready`: the caller's promise that the kernel launched just before this one did not write `x` (it
    computed `lora_in` from `x`, as `lora_input` does after waiting for x's writer). The K loop then overlaps
    that kernel; only the LoRA term and the outputs wait for it (vrft.kernels.launch_order).

    `silu_pairs`: the two weights are a gate and an up projection of one shape without bias, and the launch
    returns `silu(gate) * up` `[M, N]` instead of the two outputs side by side (`_store_silu_pairs`).
    """
    packed, quant_state, bias, lora_b = first
    rows, in_features = x.shape
    reason = silu_pairs_unsupported(out_features, table, bias) if silu_pairs else None
    if reason is not None:
        raise ValueError(f"silu_pairs: {reason}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:  # x_shared only where the kernel waits for x, and on 16-row tiles (MMA_DEFAULTS)
        timed = not x_ready and rows <= 16
        config = launch_config(
            rows, sum(out_features), in_features, x.device, **({} if timed else {"x_shared": 0})
        )
    config = dict(config)
    block_m, block_n, blocks = config["BLOCK_M"], config["BLOCK_N"], config["BLOCKS"]
    split_k, warps = config["SPLIT_K"], config["num_warps"]
    steps = in_features // (64 * blocks)
    if in_features % (64 * blocks) or triton.cdiv(steps, triton.cdiv(steps, split_k)) != split_k:
        raise ValueError(f"SPLIT_K={split_k} leaves a K slice empty or K={in_features} is not whole steps")
    if rows > block_m:
        raise ValueError(f"{rows} rows > BLOCK_M={block_m}")
    grid = (sum(triton.cdiv(n, block_n) for n in out_features), 1, split_k)
    width = out_features[0] if silu_pairs else sum(out_features)
    y, partial, counters = launch_outputs(x, width, grid, block_m, block_n, through_workspace=silu_pairs)
    nested = quant_state.nested
    state2 = quant_state.state2 if nested else quant_state
    if lora_in is not None and lora_in.stride(1) != 1:
        lora_in = lora_in.contiguous()
    constants = kernel_constants(
        config, nested, state2.blocksize if nested else 1, bias is not None,
        max(16, triton.next_power_of_2(rank)) if rank else 0, 0 if table is None else len(out_features),
        quant_state.absmax.data_ptr() % 4 == 0, in_features, silu_pairs,
    )  # fmt: skip
    _mma_4bit_kernel[grid](
        x, packed.reshape(-1).view(torch.int32), quant_state.absmax, quant_state.code, state2.absmax, state2.code,
        quant_state.offset if nested else quant_state.absmax, bias if bias is not None else y,
        lora_in if rank else y, lora_b if rank else y, float(lora_scale), partial, counters, y,
        table if table is not None else counters,
        rows, out_features[0], in_features, x.stride(0), lora_in.stride(0) if rank else 0, y.stride(0), rank,
        triton.cdiv(steps, split_k), split_k, **constants,
        num_warps=warps, **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}),
        X_READY=x_ready, **launch_options(x.device),
    )  # fmt: skip
    return y


# the most shared memory the slice's scales may take (absmax_shared): a K slice longer than this many
# blocks a row keeps the per-step absmax loads
SCALES_BYTES = 16384


def slice_scales(config: dict, in_features: int) -> dict:
    """`SLICE_BLOCKS` (the quantisation blocks of one K slice a row, to a power of two; 0 where
    `absmax_shared` is off or they would take more than `SCALES_BYTES`) and the layouts the kernel keeps
    them in: distributed while worked out, shared after."""
    block_n, blocks, warps = config["BLOCK_N"], config["BLOCKS"], config["num_warps"]
    steps = in_features // (64 * blocks)
    slice_blocks = triton.next_power_of_2(triton.cdiv(steps, config["SPLIT_K"]) * blocks)
    if not config.get("absmax_shared") or slice_blocks * block_n * 4 > SCALES_BYTES:
        slice_blocks = 0
    return {
        "SLICE_BLOCKS": slice_blocks,
        "SCALES": gl.BlockedLayout([1, max(1, block_n // 32)], [1, 32], [warps, 1], [1, 0]),
        "SCALES_SHARED": gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
    }


def x_slice_bytes(steps: int, split_k: int, blocks: int, block_m: int) -> int:
    """The shared memory that `x_shared` gives x's K slice: its loop steps to a power of two, `64 blocks`
    columns of `block_m` 16-bit rows each."""
    return triton.next_power_of_2(triton.cdiv(steps, split_k)) * 64 * blocks * block_m * 2


def slice_x(config: dict, in_features: int) -> dict:
    """`X_STEPS` (the loop steps of one K slice of x, to a power of two; 0 where `x_shared` is off or they
    would take more than it allows) and the layouts of a step of x: distributed as the program's warps load
    it (each a quarter of the step), and in shared memory, where the loop's reads (`layouts`' x: a thread
    16 consecutive columns of a row, lanes 4 column groups x 8 rows) take 16 bytes a lane, and the eight
    lanes of each quarter warp (4 column groups x 2 rows) eight different 16-byte bank groups: no bank
    conflicts."""
    block_m, blocks, warps = config["BLOCK_M"], config["BLOCKS"], config["num_warps"]
    steps = in_features // (64 * blocks)
    x_steps = triton.next_power_of_2(triton.cdiv(steps, config["SPLIT_K"]))
    if (
        not config.get("x_shared")
        or x_slice_bytes(steps, config["SPLIT_K"], blocks, block_m) > config["x_shared"]
    ):
        x_steps = 0
    m_repeats = [[0, 8 * 2**i] for i in range((block_m // 8).bit_length() - 1)]
    x_blocks = [[64 * 2**i, 0] for i in range(blocks.bit_length() - 1)]
    spread = x_blocks + m_repeats  # the warps take the first of these, the registers the rest
    warp_bits = warps.bit_length() - 1
    loading = gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0], *spread[warp_bits:]],
        lane_bases=[[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=(spread + [[0, 0]] * warp_bits)[:warp_bits],
        block_bases=[],
        shape=[64 * blocks, block_m],
    )
    return {
        "X_STEPS": x_steps,
        "XP": loading,
        # a step's [STEP, BLOCK_M] (the leading axis of the buffer indexes the steps), columns contiguous,
        # each row's 16-byte units XOR-ed with its low three bits
        "X_SHARED": gl.SwizzledSharedLayout(8, 1, 8, [0, 1]),
    }


def kernel_constants(config: dict, nested: bool, nested_blocksize: int, has_bias: bool, lora_rank: int,
                     segments: int, absmax_aligned: bool, in_features: int,
                     silu_pairs: bool = False) -> dict:  # fmt: skip
    """The kernel's compile-time arguments for launch config `config` and a call's facts (`LORA_RANK` 0 or a
    power of two >= 16; `segments` 0 for one weight; `absmax_aligned`: the absmax bytes start at a multiple
    of 4; `in_features` K; `silu_pairs` as `launch`'s): what `launch` passes and `nf4_offline.compile_mma`
    compiles with."""
    block_n, block_m, blocks = config["BLOCK_N"], config["BLOCK_M"], config["BLOCKS"]
    # one absmax word a row and step: a step's BLOCKS bytes lie in one aligned word and one second-level block
    absmax_words = (
        config.get("absmax_words", False) and nested and 4 % blocks == 0 and nested_blocksize % blocks == 0
        and absmax_aligned
    )  # fmt: skip
    mma, operand_a, operand_b, words, x_layout, sectors = layouts(
        block_n, block_m, blocks, config["num_warps"]
    )
    return {
        "NESTED": nested, "NESTED_BLOCKSIZE": nested_blocksize, "HAS_BIAS": has_bias, "LORA_RANK": lora_rank,
        "SEGMENTS": segments, "SILU_PAIRS": silu_pairs, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCKS": blocks, "SPLIT": config["SPLIT_K"] > 1, "ABSMAX_WORDS": absmax_words,
        "PREFETCH": config.get("prefetch", 0), "CLAMP_ROWS": config.get("clamp_rows", False),
        **slice_scales(config, in_features), **slice_x(config, in_features),
        "MMA": mma, "A": operand_a, "B": operand_b, "WORDS": words, "XL": x_layout, "SECTORS": sectors,
    }  # fmt: skip
