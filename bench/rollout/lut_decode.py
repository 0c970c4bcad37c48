"""A candidate decode for `nf4_mma`'s K loop: each packed byte looked up in a shared-memory table of code pairs,
for `mma_anatomy.py`'s `decode_lut` stages. Not used by vrft. On the H100, on the kernel's grid, the table's
fill (once per program) cost more than the 3.5-4 loop steps of the K split saved. On a persistent grid the
decode stage alone was faster: gate+up 34.3 us against the kernel's 40.7. With x and the absmax in the loop
it was no faster than the byte permutes (128 registers, a spill, shared loads beside x's):
bench/rollout/results.md, "Decoding by table lookups".

Why: the 4-bit kernel is bound by the instructions it issues, not by its bytes (bench/rollout/results.md,
"Where the 4-bit kernel's time goes"), and the byte-permute decode (`nf4_decode.PRMT_DECODE_PTX`) takes 21
of them for a word of eight codes. A byte holds two codes, so a table of the 256 byte values' code pairs
(`bf16(code[byte >> 4])` in the low half, `bf16(code[byte & 15])` in the high half: elements 2i and 2i + 1,
as bitsandbytes packs them) turns a word into its four operand registers with four byte extracts, four
address computations and four shared-memory loads: 12 instructions. The table is stored once per lane
(32 copies, 32 KB), entry e of lane l at word `32 e + l`, so that the 32 lanes of a load always hit 32
different banks whatever bytes they look up.

Gluon has no way to hand inline PTX a shared-memory address, so the table is declared in PTX
(`.shared .b32 vrft_code_pairs[8192]`, once, by `code_pair_table`) and its address is passed on as a
number; Triton's own shared memory is separate from it. The decoded codes are those of
`nf4_mma._decode`, bit for bit (the same bf16 code values in the same registers).

    PYTHONPATH=<Triton 3.6> python bench/rollout/lut_decode.py      # sm_90 and sm_89 loop instructions
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from vrft.kernels.nf4_mma import CODES_PERMUTATION, _per_block, _permuted

TABLE_WORDS = gl.constexpr(256 * 32)
# Declares the table (once: the only call sits before the K loop) and returns its shared-window address.
_DECLARE_PTX = f".shared .align 16 .b32 vrft_code_pairs[{TABLE_WORDS.value}];\nmov.u32 $0, vrft_code_pairs;"
# Stores `$3` at word `$2` of the table at `$1`; `$0` is a dummy output (inline asm must return one).
_STORE_PTX = """{
.reg .b32 address;
mad.lo.u32 address, $2, 4, $1;
st.shared.b32 [address], $3;
mov.u32 $0, 0;
}"""
# One int32 word -> its eight codes `$0 .. $7` in element order, from the table at `$9` (the lane's copy:
# `%laneid` read here, once per word unless ptxas shares it).
_LOOKUP_PTX = (
    """{
.reg .b32 lane, base, byte, address, pair;
mov.u32 lane, %laneid;
mad.lo.u32 base, lane, 4, $9;
"""
    + "".join(
        f"""prmt.b32 byte, $8, 0, 0x444{j};
mad.lo.u32 address, byte, 128, base;
ld.shared.b32 pair, [address];
mov.b32 {{${2 * j}, ${2 * j + 1}}}, pair;
"""
        for j in range(4)
    )
    + "}"
)

DECLARE_PTX = gl.constexpr(_DECLARE_PTX)
STORE_PTX = gl.constexpr(_STORE_PTX)
LOOKUP_PTX = gl.constexpr(_LOOKUP_PTX)
LOOKUP_CONSTRAINTS = gl.constexpr(",".join(["=h"] * 8 + ["r"] * 2))
CODES_PERMUTATION_C = gl.constexpr(CODES_PERMUTATION)


@gluon.jit
def code_pair_table(code_ptr, DTYPE: gl.constexpr, WARPS: gl.constexpr):
    """The table of code pairs in shared memory, filled by all of the program's threads (one barrier after):
    its shared-window address."""
    # (an argument it does not read: inline asm takes at least one)
    table = gl.inline_asm_elementwise(DECLARE_PTX, "=r,r", [gl.program_id(0)], dtype=gl.int32, is_pure=False,
                                      pack=1)  # fmt: skip
    word = gl.arange(0, TABLE_WORDS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    entry = word // 32  # the byte value; word % 32 is the lane whose copy this is
    high = gl.load(code_ptr + (entry >> 4)).to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    low = gl.load(code_ptr + (entry & 15)).to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    gl.inline_asm_elementwise(STORE_PTX, "=r,r,r,r", [table, word, high | (low << 16)], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip
    gl.thread_barrier()
    return table


@gluon.jit
def decode_lut(words, table, BLOCK_N: gl.constexpr, BLOCKS: gl.constexpr, DTYPE: gl.constexpr):
    """`nf4_mma._decode` by table lookups: packed words `[BLOCK_N, 8 BLOCKS]` -> per block the codes
    `[BLOCK_N, 64]` in the kernel's K order, in a layout equal to the A operand's up to register order."""
    c0, c1, c2, c3, c4, c5, c6, c7 = gl.inline_asm_elementwise(
        LOOKUP_PTX, LOOKUP_CONSTRAINTS, [words, table], dtype=(gl.int16,) * 8, is_pure=True, pack=1
    )
    # as `_decode`: element e = b + 2 h + 4 j0 joined with j0 first and b last (nf4_mma.CODE_JOINS)
    codes = gl.join(
        gl.join(gl.join(c0, c4), gl.join(c2, c6)),
        gl.join(gl.join(c1, c5), gl.join(c3, c7)),
    ).to(DTYPE, bitcast=True)
    codes = gl.reshape(codes, [BLOCK_N, BLOCKS, 2, 2, 2, 2, 2, 2])
    codes = _permuted(codes, CODES_PERMUTATION_C)
    codes = gl.reshape(codes, [BLOCK_N, 64, BLOCKS])
    return _per_block(codes, BLOCKS)


def loop_counts(arch: int) -> dict[str, dict]:
    """`mma_anatomy`'s `decode` and `decode_lut` stages compiled for `sm_<arch>` with the 16-row tiles of the
    engine's launches: their K loop's instructions by opcode, registers, spills, shared memory."""
    sys.path.insert(0, str(Path(__file__).parent))
    from mma_anatomy import _anatomy_kernel, stage_constants

    from vrft.kernels.nf4_offline import compile_gluon, main_loop, opcode, registers, sass

    config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCKS": 4, "num_warps": 4, "maxnreg": 128, "SPLIT_K": 2}
    pointers = {
        "x_ptr": "X", "packed_ptr": "i32", "absmax_ptr": "u8", "code_ptr": "fp32", "absmax2_ptr": "fp32",
        "code2_ptr": "fp32", "offset_ptr": "fp32", "sums_ptr": "fp32", "bits_ptr": "i32",
    }  # fmt: skip
    counts = {}
    for stage in ("decode", "decode_lut"):
        compiled = compile_gluon(_anatomy_kernel, stage_constants(stage, config), pointers, 4, arch,
                                 maxnreg=config["maxnreg"])  # fmt: skip
        loop = main_loop(sass(compiled))
        counts[stage] = {
            "instructions": len(loop),
            "opcodes": dict(collections.Counter(opcode(text) for text in loop).most_common()),
            **registers(compiled),
            "shared_bytes": compiled.metadata.shared,
        }
    return counts


if __name__ == "__main__":
    for arch in (90, 89):
        for stage, found in loop_counts(arch).items():
            print(f"sm_{arch} {stage}: {found}")
