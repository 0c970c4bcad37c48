"""Where `nf4_mma`'s time goes: its K loop with parts taken out, timed on the 7B projections.

    python bench/rollout/mma_anatomy.py --out mma_anatomy.json [--rows 16]
    python bench/rollout/mma_anatomy.py --out mma_kernels.json --kernels   # KERNEL_VARIANTS only
    python bench/rollout/mma_anatomy.py --out lut.json --stages decode,decode_lut,decode_x,decode_lut_x

Why: the 4-bit kernel runs at ~1.2 TB/s on the H200 and on the H100 alike (bench/rollout/results.md), so
neither card's bandwidth bounds it, and sweeps of tiles, warps, register caps, K splits and load orders
moved it by a few percent. Before changing its main loop, this measures what each part of the loop costs
by removing the others: `nf4_mma._mma_4bit_kernel`'s loop rebuilt from its own helpers (`_decode`,
`_x_operands`, `_absmax_word`, the layouts), with the same grid (`nf4_mma.launch_config`), step by step:

- `loads`: only the packed codes, loaded a step ahead as the kernel does, XOR-ed together (what the memory
  system gives this access pattern); `loads_ahead2` two steps ahead (twice the bytes in flight),
  `loads_wide` with each warp's load covering 4 rows x 128 contiguous bytes instead of 8 rows x 32;
  `loads_persistent_P` (and `_wide_`) on a fixed grid of P programs a multiprocessor, each streaming item
  after item with no cold start;
- `decode`: + decoding (byte permutes) and the tensor-core products against a constant operand;
  `decode_lut` decodes by table lookups instead (`lut_decode.py`; its sums must equal `decode`'s, bit for
  bit, and `decode_lut_x`'s `decode_x`'s: `same_sums`);
- `decode_x`: + `x`'s loads and operands (the products are then the real ones); `decode_x_hot` reads the
  first step's x at every step (an L1 hit);
- `scaled`: + each block's absmax (the words, a step ahead) and the scaling: the kernel's loop before
  `absmax_shared` (which works the slice's absmax out before the loop);
- `kernel`: `matmul_4bit_mma` itself (its split-K epilogue, output store).

`--kernels` times only `matmul_4bit_mma`, at each of `KERNEL_VARIANTS`, on these launches: what a switch of
`MMA_DEFAULTS` changes in the engine's decode step, where `mma_sweep.py` times one weight at a time (gate
alone, whose K split differs from gate+up's).

Each program stores its own sums (no split-K reduction) so nothing is optimised away. Timed as
`kernel_sweep.measure` times (CUDA-graph replays over weight copies that add up to 3x the L2: every call
reads HBM). Only `kernel` is checked against bitsandbytes (the others compute something else by design).
JSON to `--out`, log beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "memory"))
from kernel_sweep import Log, packed_bytes, packed_copies, time_us  # noqa: E402
from lut_decode import code_pair_table, decode_lut  # noqa: E402
from speed import device_bandwidth  # noqa: E402

from vrft.kernels.nf4_mma import (  # noqa: E402
    _absmax_word,
    _byte_tables,
    _decode,
    _x_operands,
    launch_config,
    layouts,
    matmul_4bit_mma,
)
from vrft.kernels.workspace import multiprocessors  # noqa: E402

DEVICE = torch.device("cuda")
# the engine's launches (`matmul_4bit_segments` over gate+up and over q+k+v), and down and o alone
SHAPES = {"gate_up": (37888, 3584), "down": (3584, 18944), "q_k_v": (4608, 3584), "o": (3584, 3584)}
# `--kernels`: name -> launch_config choices: the defaults (x_shared at 32 KB since the sixteenth session),
# without x_shared, and x_shared at 32 and 64 KB (gate+up's K split 2 -> 4 for 32 KB; 64 KB keeps 2 with three
# programs a multiprocessor). At commit aca2679 (results/x_shared_kernels_call/, `kernel` then without
# x_shared) also 16 programs a multiprocessor (split 4, no x_shared)
KERNEL_VARIANTS = {
    "kernel": {},
    "kernel_x_shared_off": {"x_shared": 0},
    "kernel_x_shared_32k": {"x_shared": 32768},
    "kernel_x_shared_64k": {"x_shared": 65536},
}
# stage: (decode, load x, scale, code loads in flight a warp, wide loads, x always from the first step)
STAGES = {
    "loads": (0, 0, 0, 1, 0, 0),
    "loads_ahead2": (0, 0, 0, 2, 0, 0),
    "loads_wide": (0, 0, 0, 1, 1, 0),
    "loads_wide_ahead2": (0, 0, 0, 2, 1, 0),
    "decode": (1, 0, 0, 1, 0, 0),
    "decode_lut": (2, 0, 0, 1, 0, 0),  # decode 2: lut_decode's table lookups instead of byte permutes
    "decode_x": (1, 1, 0, 1, 0, 0),
    "decode_lut_x": (2, 1, 0, 1, 0, 0),
    "decode_x_hot": (1, 1, 0, 1, 0, 1),
    "scaled": (1, 1, 1, 1, 0, 0),
}


@gluon.jit
def _constant_operand(BLOCK_M: gl.constexpr, B: gl.constexpr, DTYPE: gl.constexpr):
    """The B operand without x: a different constant in each column, so that the compiler cannot merge the
    products of the two 8-column halves."""
    constant_k = gl.arange(0, 64, layout=gl.SliceLayout(1, B))
    constant_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, B))
    return (constant_k[:, None] * 0 + constant_m[None, :]).to(DTYPE)


@gluon.jit
def _scaled(product, absmax_word, byte, code2_ptr, scale2, offset):
    """A block's product times its absmax: byte `byte` of the step's absmax word, looked up in the second
    level's code book and scaled as `dequantize_4bit` does."""
    quantised = (absmax_word >> (byte * 8)) & 0xFF
    return product * (gl.load(code2_ptr + quantised) * scale2 + offset)[:, None]


@gluon.jit
def _store_sums(sums_ptr, program, acc, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, MMA: gl.constexpr):
    """Each program's own sums, stored so that nothing is optimised away."""
    local = (
        gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))[:, None] * BLOCK_M
        + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))[None, :]
    )
    gl.store(sums_ptr + program * (BLOCK_N * BLOCK_M) + local, acc)


@gluon.jit
def _anatomy_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, sums_ptr, bits_ptr,
    K, stride_xm, iters_per_split, x_steps,
    DECODE: gl.constexpr, LOAD_X: gl.constexpr, SCALE: gl.constexpr, AHEAD: gl.constexpr,
    NESTED_BLOCKSIZE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr,
    MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, WORDS: gl.constexpr, XL: gl.constexpr,
):  # fmt: skip
    """`_mma_4bit_kernel`'s loop (no masks: N a multiple of BLOCK_N, M = BLOCK_M) with parts switched off."""
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    STEP: gl.constexpr = 64 * BLOCKS
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(2)
    program = pid_k * gl.num_programs(0) + pid_n
    rows_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS))
    words_w = gl.arange(0, 8 * BLOCKS, layout=gl.SliceLayout(0, WORDS))
    # (rows 16-byte aligned: K is a multiple of 32 on every shape here; `_item_step_pointers` says why)
    word_ptrs = packed_ptr + gl.multiple_of(rows_w.to(gl.int64) * (K // 8), 4)[:, None] + words_w[None, :]
    columns_x = gl.arange(0, STEP, layout=gl.SliceLayout(1, XL))
    rows_x = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XL))
    x_ptrs = x_ptr + (rows_x.to(gl.int64) * stride_xm)[None, :] + columns_x[:, None]
    rows_s = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    row_blocks = rows_s * (K // 64)
    offset = gl.load(offset_ptr)
    tables = _byte_tables(code_ptr, DTYPE, gl.num_warps())
    lut = 0
    if DECODE == 2:
        lut = code_pair_table(code_ptr, DTYPE, gl.num_warps())
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    bits = gl.zeros([BLOCK_N, 8 * BLOCKS], gl.int32, WORDS)
    constant = _constant_operand(BLOCK_M, B, DTYPE)
    first = pid_k * iters_per_split
    last = gl.minimum(first + iters_per_split, K // STEP)
    words_next = gl.load(word_ptrs + first * (8 * BLOCKS))
    words_after = words_next  # AHEAD 2: the step after next
    if AHEAD == 2:
        words_after = gl.load(word_ptrs + gl.minimum(first + 1, last - 1) * (8 * BLOCKS))
    if SCALE:
        absmax_next = _absmax_word(
            absmax_ptr, absmax2_ptr, row_blocks + first * BLOCKS, None, NESTED_BLOCKSIZE
        )
    for step in range(first, last):
        words = words_next
        ahead = gl.minimum(step + 1, last - 1)
        if AHEAD == 2:
            words_next = words_after
            words_after = gl.load(word_ptrs + gl.minimum(step + 2, last - 1) * (8 * BLOCKS))
        else:
            words_next = gl.load(word_ptrs + ahead * (8 * BLOCKS))
        absmax_word, scale2 = 0, 0.0
        if SCALE:
            absmax_word, scale2 = absmax_next
            absmax_next = _absmax_word(absmax_ptr, absmax2_ptr, row_blocks + ahead * BLOCKS, None,
                                       NESTED_BLOCKSIZE)  # fmt: skip
        if DECODE:
            if DECODE == 2:
                codes = decode_lut(words, lut, BLOCK_N, BLOCKS, DTYPE)
            else:
                codes = _decode(words, tables, BLOCK_N, BLOCKS, DTYPE)
            if LOAD_X:
                # x_steps 0 (HOT_X): the first step's x at every step, an L1 hit; a run-time 0, so that the
                # compiler cannot hoist the loads out of the loop
                operands = _x_operands(gl.load(x_ptrs + step * x_steps * STEP), BLOCK_M, BLOCKS, B)
            zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
            first_block = row_blocks + step * BLOCKS
            for block in gl.static_range(BLOCKS):
                a = gl.convert_layout(codes[block], A)
                if LOAD_X:
                    b = gl.convert_layout(operands[block], B)
                else:
                    b = constant
                product = mma_v2(a, b, zero)
                if SCALE:
                    acc += _scaled(product, absmax_word, first_block % 4 + block, code2_ptr, scale2, offset)
                else:
                    acc += product
        else:
            bits = bits ^ words
    _store_sums(sums_ptr, program, acc, BLOCK_N, BLOCK_M, MMA)
    local_bits = (
        gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS))[:, None] * (8 * BLOCKS)
        + gl.arange(0, 8 * BLOCKS, layout=gl.SliceLayout(0, WORDS))[None, :]
    )
    gl.store(bits_ptr + program * (BLOCK_N * 8 * BLOCKS) + local_bits, bits)


@gluon.jit
def _persistent_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bits_ptr, sums_ptr,
    K, stride_xm, tiles, split_k, iters_per_split,
    DECODE: gl.constexpr, SCALED: gl.constexpr, NESTED_BLOCKSIZE: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr,
    WORDS: gl.constexpr, XL: gl.constexpr,
):  # fmt: skip
    """The `loads` stage (DECODE 0) or the `decode` stage (1: byte permutes, 2: `lut_decode`'s table, filled
    once per program) on a fixed grid: each program streams the steps of its (tile, K slice) items, items
    `program, program + programs, ...`, one after the other, the next step's codes (the next item's first
    step at an item's end) always in flight; no program starts cold after the first. The decode stage
    multiplies every step against a constant operand, into one sum; with SCALED, as the `scaled` stage,
    against x's step (loaded where used) and scaled by each block's absmax (the words, a step ahead)."""
    DTYPE: gl.constexpr = gl.bfloat16
    STEP: gl.constexpr = 64 * BLOCKS
    program = gl.program_id(0)
    programs = gl.num_programs(0)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS))
    words_w = gl.arange(0, 8 * BLOCKS, layout=gl.SliceLayout(0, WORDS))
    total = (tiles * split_k - program + programs - 1) // programs * iters_per_split
    tables, lut = 0, 0
    if DECODE == 1:
        tables = _byte_tables(code_ptr, DTYPE, gl.num_warps())
    if DECODE == 2:
        lut = code_pair_table(code_ptr, DTYPE, gl.num_warps())
    constant = _constant_operand(BLOCK_M, B, DTYPE)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    bits = gl.zeros([BLOCK_N, 8 * BLOCKS], gl.int32, WORDS)
    columns_x = gl.arange(0, STEP, layout=gl.SliceLayout(1, XL))
    rows_x = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XL))
    x_ptrs = x_ptr + (rows_x.to(gl.int64) * stride_xm)[None, :] + columns_x[:, None]
    rows_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    offset = 0.0
    absmax_next = (0, 0.0)
    if SCALED:
        offset = gl.load(offset_ptr)
        absmax_next = _item_absmax(absmax_ptr, absmax2_ptr, 0, program, programs, K, split_k, iters_per_split,
                                   rows_s, NESTED_BLOCKSIZE, BLOCK_N, BLOCKS)  # fmt: skip
    words_next = gl.load(_item_step_pointers(packed_ptr, 0, program, programs, K, split_k, iters_per_split,
                                             rows, words_w, BLOCK_N, STEP))  # fmt: skip
    for index in range(total):
        words = words_next
        following = gl.minimum(index + 1, total - 1)
        words_next = gl.load(_item_step_pointers(packed_ptr, following, program, programs, K, split_k,
                                                 iters_per_split, rows, words_w, BLOCK_N, STEP))  # fmt: skip
        if DECODE == 0:
            bits = bits ^ words
        else:
            absmax_word, scale2, operands = 0, 0.0, 0
            if SCALED:
                absmax_word, scale2 = absmax_next
                absmax_next = _item_absmax(absmax_ptr, absmax2_ptr, following, program, programs, K, split_k,
                                           iters_per_split, rows_s, NESTED_BLOCKSIZE, BLOCK_N, BLOCKS)  # fmt: skip
                _, step = _item_step(index, program, programs, K, split_k, iters_per_split, STEP)
                operands = _x_operands(gl.load(x_ptrs + step * STEP), BLOCK_M, BLOCKS, B)
            if DECODE == 2:
                codes = decode_lut(words, lut, BLOCK_N, BLOCKS, DTYPE)
            else:
                codes = _decode(words, tables, BLOCK_N, BLOCKS, DTYPE)
            for block in gl.static_range(BLOCKS):
                a = gl.convert_layout(codes[block], A)
                if SCALED:
                    product = mma_v2(a, gl.convert_layout(operands[block], B), zero)
                    # a step's blocks: bytes 0-3 of one aligned word
                    acc += _scaled(product, absmax_word, block, code2_ptr, scale2, offset)
                else:
                    acc += mma_v2(a, constant, zero)
    if DECODE == 0:
        local_bits = rows[:, None] * (8 * BLOCKS) + words_w[None, :]
        gl.store(bits_ptr + program * (BLOCK_N * 8 * BLOCKS) + local_bits, bits)
    else:
        _store_sums(sums_ptr, program, acc, BLOCK_N, BLOCK_M, MMA)


@gluon.jit
def _item_step(index, program, programs, K, split_k, iters_per_split, STEP: gl.constexpr):
    """A persistent program's `index`-th step: the tile of its item, and the step within K."""
    item = program + (index // iters_per_split) * programs
    step = gl.minimum((item % split_k) * iters_per_split + index % iters_per_split, K // STEP - 1)
    return item // split_k, step


@gluon.jit
def _item_absmax(absmax_ptr, absmax2_ptr, index, program, programs, K, split_k, iters_per_split, rows_s,
                 NESTED_BLOCKSIZE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr):  # fmt: skip
    """`_absmax_word` of a persistent program's `index`-th step (the tile's rows `rows_s`, local)."""
    tile, step = _item_step(index, program, programs, K, split_k, iters_per_split, 64 * BLOCKS)
    first_block = (tile * BLOCK_N + rows_s) * (K // 64) + step * BLOCKS
    return _absmax_word(absmax_ptr, absmax2_ptr, first_block, None, NESTED_BLOCKSIZE)


@gluon.jit
def _item_step_pointers(packed_ptr, index, program, programs, K, split_k, iters_per_split, rows, words_w,
                        BLOCK_N: gl.constexpr, STEP: gl.constexpr):  # fmt: skip
    """The codes' addresses of a persistent program's `index`-th step: item, its tile and K slice, the step
    (K a multiple of 32)."""
    tile, step = _item_step(index, program, programs, K, split_k, iters_per_split, STEP)
    # rows start 16-byte aligned where K is a multiple of 32 (every Qwen2-VL projection): said, so that a
    # thread's four words are one 16-byte load
    row_words = gl.multiple_of((tile * BLOCK_N + rows).to(gl.int64) * (K // 8), 4)
    return packed_ptr + row_words[:, None] + words_w[None, :] + step * (STEP // 8)


def persistent(config: dict, programs_per_sm: int, wide: bool = False, decode: int = 0, scaled: bool = False):
    """`_persistent_kernel` launched as `anatomy` launches the stages, on `programs_per_sm` programs per
    multiprocessor: the loads (`decode` 0; `wide`: `wide_words`' layout) or the decode stage (1, 2; `scaled`:
    the `scaled` stage)."""
    block_m, block_n, blocks, split_k = (
        config["BLOCK_M"],
        config["BLOCK_N"],
        config["BLOCKS"],
        config["SPLIT_K"],
    )
    mma, operand_a, operand_b, words, x_layout, _ = layouts(block_n, block_m, blocks, config["num_warps"])
    if wide:
        words = wide_words()
    outputs = {}

    def launch(x, packed, state, config=None):
        out_features, in_features = state.shape
        steps = in_features // (64 * blocks)
        grid = (programs_per_sm * multiprocessors(x.device),)
        if "sums" not in outputs:  # one buffer for every call: what they hold is read by `same_sums` only
            outputs["sums"] = torch.empty(grid[0] * block_n * block_m, dtype=torch.float32, device=x.device)
            outputs["bits"] = torch.empty(grid[0] * block_n * 8 * blocks, dtype=torch.int32, device=x.device)
        state2 = state.state2
        _persistent_kernel[grid](
            x, packed.reshape(-1).view(torch.int32), state.absmax, state.code, state2.absmax, state2.code,
            state.offset, outputs["bits"], outputs["sums"], in_features, x.stride(0), out_features // block_n,
            split_k, triton.cdiv(steps, split_k), DECODE=decode, SCALED=scaled,
            NESTED_BLOCKSIZE=state2.blocksize, BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS=blocks, MMA=mma,
            A=operand_a, B=operand_b, WORDS=words, XL=x_layout,
            num_warps=config["num_warps"], **({"maxnreg": config["maxnreg"]} if decode and config.get("maxnreg") else {}),
        )  # fmt: skip

    launch.outputs = outputs
    return launch


def wide_words():
    """A words layout whose warp loads cover 4 rows x 128 contiguous bytes (16 a thread), not 8 rows x 32
    bytes: 64 rows, 4 blocks a step, 4 warps."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [4, 0], [8, 0]],
        lane_bases=[[0, 4], [0, 8], [0, 16], [1, 0], [2, 0]],
        warp_bases=[[16, 0], [32, 0]],
        block_bases=[],
        shape=[64, 32],
    )


def stage_constants(stage: str, config: dict, nested_blocksize: int = 256) -> dict:
    """`_anatomy_kernel`'s compile-time arguments at `stage` of `STAGES`, tiles as `config` (`launch_config`)."""
    decode, load_x, scale, ahead, wide, _ = STAGES[stage]
    block_m, block_n, blocks = config["BLOCK_M"], config["BLOCK_N"], config["BLOCKS"]
    mma, operand_a, operand_b, words, x_layout, _ = layouts(block_n, block_m, blocks, config["num_warps"])
    if wide:
        assert (block_n, blocks, config["num_warps"]) == (64, 4, 4), config
        words = wide_words()
    return {
        "DECODE": decode, "LOAD_X": load_x, "SCALE": scale, "AHEAD": ahead, "NESTED_BLOCKSIZE": nested_blocksize,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCKS": blocks, "MMA": mma, "A": operand_a, "B": operand_b,
        "WORDS": words, "XL": x_layout,
    }  # fmt: skip


def anatomy(stage: str, config: dict):
    """A function `(x, packed, state, config=None)` that launches the kernel at `stage` of `STAGES` with the
    grid and tiles of `config` (`launch_config`), as `time_us` calls the kernels it times."""
    block_m, block_n, blocks, split_k = (
        config["BLOCK_M"],
        config["BLOCK_N"],
        config["BLOCKS"],
        config["SPLIT_K"],
    )
    hot_x = STAGES[stage][5]
    outputs = {}

    def launch(x, packed, state, config=None):
        out_features, in_features = state.shape
        steps = in_features // (64 * blocks)
        grid = (out_features // block_n, 1, split_k)
        programs = grid[0] * split_k
        if "sums" not in outputs:  # one buffer for every call: what they hold is never read
            outputs["sums"] = torch.empty(programs * block_n * block_m, dtype=torch.float32, device=x.device)
            outputs["bits"] = torch.empty(programs * block_n * 8 * blocks, dtype=torch.int32, device=x.device)
        state2 = state.state2
        _anatomy_kernel[grid](
            x, packed.reshape(-1).view(torch.int32), state.absmax, state.code, state2.absmax, state2.code,
            state.offset, outputs["sums"], outputs["bits"], in_features, x.stride(0),
            triton.cdiv(steps, split_k), 0 if hot_x else 1, **stage_constants(stage, config, state2.blocksize),
            num_warps=config["num_warps"], **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}),
        )  # fmt: skip

    launch.outputs = outputs  # what the last call stored (`same_sums`)
    return launch


# stages that compute the same products in another way: their sums must be equal, bit for bit
SAME_SUMS = (
    ("decode", "decode_lut"),
    ("decode_x", "decode_lut_x"),
    ("decode_persistent_4", "decode_lut_persistent_4"),
    ("scaled_persistent_4", "scaled_lut_persistent_4"),
)
# persistent decode stages (`persistent`): name -> (decode, programs per multiprocessor, scaled)
PERSISTENT_DECODE = {
    "decode_persistent_4": (1, 4, False),
    "decode_lut_persistent_4": (2, 4, False),
    "scaled_persistent_4": (1, 4, True),
    "scaled_lut_persistent_4": (2, 4, True),
}


def same_sums(launchers: dict, call: tuple, config: dict) -> dict[str, bool]:
    """For each pair of `SAME_SUMS` among `launchers`, whether one call of each on `call` stored the same
    sums (the table lookups decode the same bf16 codes into the same registers as the byte permutes)."""
    found = {}
    for first, second in SAME_SUMS:
        if first in launchers and second in launchers:
            sums = []
            for stage in (first, second):
                launchers[stage](*call, config=config)
                torch.cuda.synchronize()
                sums.append(launchers[stage].outputs["sums"].clone())
            found[f"{first} = {second}"] = bool(torch.equal(sums[0], sums[1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--kernels", action="store_true", help="KERNEL_VARIANTS only, no stages")
    parser.add_argument(
        "--stages", default="", help="comma-separated STAGES to time (default: all, and more)"
    )
    args = parser.parse_args()
    log = Log(args.out.with_suffix(".log"))
    torch.manual_seed(0)
    device, bandwidth = device_bandwidth()
    log(device, f"{multiprocessors(DEVICE)} multiprocessors, bound {bandwidth / 1e12} TB/s")
    results = {"device": device, "bandwidth": bandwidth, "rows": args.rows, "shapes": {}}
    for name, (out_features, in_features) in SHAPES.items():
        config = launch_config(args.rows, out_features, in_features, DEVICE)
        _, copies = packed_copies(out_features, in_features, warm_l2=False)
        x = torch.randn(args.rows, in_features, dtype=torch.bfloat16, device=DEVICE)
        calls = [(x, packed, state) for packed, state in copies]
        nbytes = packed_bytes(out_features, in_features)
        entry = {"config": config, "us": {}, "percent_of_bound": {}}
        launchers, configs = {}, {}
        if args.kernels:
            for variant, choices in KERNEL_VARIANTS.items():
                launchers[variant] = matmul_4bit_mma
                configs[variant] = launch_config(args.rows, out_features, in_features, DEVICE, **choices)
            entry["configs"] = configs
        elif args.stages:
            launchers = {
                stage: persistent(
                    config,
                    PERSISTENT_DECODE[stage][1],
                    decode=PERSISTENT_DECODE[stage][0],
                    scaled=PERSISTENT_DECODE[stage][2],
                )
                if stage in PERSISTENT_DECODE
                else anatomy(stage, config)
                for stage in args.stages.split(",")
            }
            entry["same_sums"] = same_sums(launchers, calls[0], config)
            log(f"{name}: {entry['same_sums']}")
        else:
            launchers = {stage: anatomy(stage, config) for stage in STAGES}
            entry["same_sums"] = same_sums(launchers, calls[0], config)
            log(f"{name}: {entry['same_sums']}")
            for wide in (False, True):
                for per_sm in (5, 8):
                    name_p = f"loads{'_wide' if wide else ''}_persistent_{per_sm}"
                    launchers[name_p] = persistent(config, per_sm, wide)
            launchers["kernel"] = matmul_4bit_mma
        for stage, kernel in launchers.items():
            us = time_us(kernel, calls, config=configs.get(stage, config))
            entry["us"][stage] = us
            entry["percent_of_bound"][stage] = 100 * nbytes / (us * 1e-6) / bandwidth
        results["shapes"][name] = entry
        cells = ", ".join(
            f"{s} {u:.1f} us ({entry['percent_of_bound'][s]:.0f}%)" for s, u in entry["us"].items()
        )
        log(f"{name} {out_features}x{in_features} split {config['SPLIT_K']}: {cells}")
        args.out.write_text(json.dumps(results, indent=1))
        del copies, calls
        torch.cuda.empty_cache()
    if args.kernels:  # a decoder layer runs each launch once
        for variant in KERNEL_VARIANTS:
            layer = sum(entry["us"][variant] for entry in results["shapes"].values())
            results.setdefault("layer_us", {})[variant] = layer
            log(f"{variant}: {layer:.1f} us a decoder layer")
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
