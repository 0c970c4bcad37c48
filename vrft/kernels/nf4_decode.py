"""Decoding bitsandbytes' packed 4-bit codes in registers: the three ways `nf4_matmul`'s kernel can do it.

Why three: at decode batches the fused matmul is bound by the instructions it spends per weight, not by
the bytes it reads (bench/rollout/results.md), so how a nibble becomes a value decides its speed; which
way wins is measured (bench/rollout/kernel_sweep.py --sweep), not guessed.

Storage (bitsandbytes' `quantize_4bit`): the `[N, K]` weight row-major, element `2i` in the high nibble of
byte `i`, element `2i + 1` in the low nibble. Read as little-endian int32 words, word `w` holds elements
`8w .. 8w + 7`, element `8w + p` in bits `8 (p // 2) + 4 (1 - p % 2)` and up.

- `DECODE_WORDS` (0): int32 words viewed as `[BLOCK_N, K / 8, 8]`, a shift and a mask per weight, then a
  code-book lookup. The first kernel's way.
- `DECODE_BYTES` (1): uint8 bytes; the high and low nibbles (`byte >> 4`, `byte & 15`) joined along a new
  last axis, so element `2i` sits next to `2i + 1` without a 3-D view; then the lookup.
- `DECODE_PRMT` (2): int32 words turned into 16-bit codes by byte permutes (PTX `prmt`), four bytes per
  instruction from the code book held as eight table registers: ~21 integer instructions per eight weights
  and no shuffle or shared-memory traffic. Codes only, in the compute dtype, so the kernel scales after the
  dot (`SCALE_AFTER`). The Triton interpreter has no PTX; there `_pair_emulated` reads the same table words.

The code-book lookup of the first two (`GATHER`): 1 `tl.gather` from the book held in registers (a warp
shuffle; Triton lays the result out 16 lanes across K, so it then costs a scalar shared-memory store per
weight on the way to the tensor cores), 0 a load from the L1-cached book.

Measured instruction counts (the kernel's main loop compiled for sm_90, `bench/rollout/kernel_sass.py`)
are in bench/rollout/results.md.
"""

from __future__ import annotations

DECODE_WORDS, DECODE_BYTES, DECODE_PRMT = 0, 1, 2

# One int32 word -> its eight codes as four pairs `$0 .. $3` (pair j: element 8w + 2j in the low half,
# 8w + 2j + 1 in the high half), from `$4` the word and `$5 .. $12` the code book's table words (`$5 .. $8`
# the high bytes of entries 0-3, 4-7, 8-11, 12-15; `$9 .. $12` their low bytes; see `byte_tables`).
# `prmt.b32 d, a, b, c` fills byte k of d from the eight bytes of {b, a} as nibble k of c says: its low three
# bits index, its bit 3 asks for the sign of that byte instead. So a nibble is looked up twice on its low
# three bits (entries 0-7 and 8-15) and its bit 3 picks one through a byte mask; the mask is itself a prmt in
# sign mode over {word << 4, word}, where each nibble's bit 3 is the top bit of some byte (selectors 0x9D8C,
# 0xBFAE). Byte k of a lookup is nibble k of the word, i.e. element order 1, 0, 3, 2 (and 5, 4, 7, 6 for the
# upper half); the last prmts (0x4051, 0x6273) put the low and high bytes of each pair in element order.
# lop3 0xD8 computes `(second & mask) | (first & ~mask)`.
PRMT_DECODE_PTX = """{
.reg .b32 index, index_hi, up, mask, mask_hi, first, second, high, low;
and.b32 index, $4, 0x77777777;
shr.u32 index_hi, index, 16;
shl.b32 up, $4, 4;
prmt.b32 mask, $4, up, 0x9D8C;
prmt.b32 mask_hi, $4, up, 0xBFAE;
prmt.b32 first, $5, $6, index;
prmt.b32 second, $7, $8, index;
lop3.b32 high, first, second, mask, 0xD8;
prmt.b32 first, $9, $10, index;
prmt.b32 second, $11, $12, index;
lop3.b32 low, first, second, mask, 0xD8;
prmt.b32 $0, low, high, 0x4051;
prmt.b32 $1, low, high, 0x6273;
prmt.b32 first, $5, $6, index_hi;
prmt.b32 second, $7, $8, index_hi;
lop3.b32 high, first, second, mask_hi, 0xD8;
prmt.b32 first, $9, $10, index_hi;
prmt.b32 second, $11, $12, index_hi;
lop3.b32 low, first, second, mask_hi, 0xD8;
prmt.b32 $2, low, high, 0x4051;
prmt.b32 $3, low, high, 0x6273;
}"""
# Pairs as 32-bit outputs: with eight 16-bit outputs ptxas spent ~0.4 moves per weight regrouping them for
# the 128-bit shared-memory stores.
PRMT_DECODE_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * 9)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nf4_matmul.supports() says why
    triton = None


if triton is not None:
    _BYTES, _PRMT = (
        tl.constexpr(DECODE_BYTES),
        tl.constexpr(DECODE_PRMT),
    )  # jit code reads constexpr globals only
    _PRMT_PTX, _PRMT_CONSTRAINTS = tl.constexpr(PRMT_DECODE_PTX), tl.constexpr(PRMT_DECODE_CONSTRAINTS)

    @triton.jit
    def code_books(
        code_ptr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr, GATHER: tl.constexpr, DTYPE: tl.constexpr
    ):
        """What `decode` looks codes up in, read once per program: `(book [BLOCK_N, 16] in DTYPE, tables)`.

        `book` is the 16-entry code book in registers (used by `GATHER`), `tables` its eight table words
        (`byte_tables`, used by `DECODE_PRMT`; a placeholder otherwise).
        """
        book = tl.zeros((BLOCK_N, 16), dtype=DTYPE)
        if GATHER:
            book = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16)).to(DTYPE)[None, :], (BLOCK_N, 16))
        tables = (book,)
        if DECODE == _PRMT:
            tables = byte_tables(code_ptr, DTYPE)
        return book, tables

    @triton.jit
    def decode(
        packed_ptr, rows_n, mask_n, start, K, book, code_ptr, tables,
        COLUMNS: tl.constexpr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr, GATHER: tl.constexpr,
        DTYPE: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr,
    ):  # fmt: skip
        """Values `[BLOCK_N, COLUMNS]` in `DTYPE` of columns `start ..` of weight rows `rows_n [BLOCK_N]`.

        `packed_ptr` points at int32 words, or at uint8 bytes for `DECODE_BYTES`; `book` and `tables` come
        from `code_books`. Rows off `mask_n` and, unless `EVEN` (K a multiple of the loop step), columns
        past K read as code 0.
        """
        per_row = K // 2 if DECODE == _BYTES else K // 8
        row_start = packed_ptr + rows_n.to(tl.int64) * per_row
        if DECODE == _BYTES:
            column = start // 2 + tl.arange(0, COLUMNS // 2)
        else:
            column = start // 8 + tl.arange(0, COLUMNS // 8)
        mask = mask_n[:, None] & ((column < per_row) | EVEN)[None, :]
        packed = tl.load(row_start[:, None] + column[None, :], mask=mask, other=0)
        if DECODE == _PRMT:
            value = _decode_prmt(packed, tables, COLUMNS, BLOCK_N, DTYPE, PTX)
        else:
            if DECODE == _BYTES:  # [BLOCK_N, COLUMNS / 2, 2]: high nibble first, as the storage orders them
                nibbles = tl.join(packed >> 4, packed & 15).to(tl.int32)
            else:  # [BLOCK_N, COLUMNS / 8, 8]: element p of a word at bit 8 (p // 2) + 4 (1 - p % 2)
                position = tl.arange(0, 8)
                shift = 8 * (position // 2) + 4 * (1 - position % 2)
                nibbles = (packed[:, :, None] >> shift[None, None, :]) & 15
            nibbles = tl.reshape(nibbles, (BLOCK_N, COLUMNS))
            if GATHER:
                value = tl.gather(book, nibbles, axis=1)
            else:
                value = tl.load(code_ptr + nibbles).to(DTYPE)
        return value

    @triton.jit
    def byte_tables(code_ptr, DTYPE: tl.constexpr):
        """The code book in `DTYPE` as eight int32 words: high bytes of entries 0-3 .. 12-15, then low bytes."""
        entry = tl.arange(0, 16)
        bits = tl.load(code_ptr + entry).to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        high = (bits >> 8) << (8 * (entry % 4))  # entry e's byte at its place in word e // 4
        low = (bits & 0xFF) << (8 * (entry % 4))
        word = entry // 4
        return (
            tl.sum(tl.where(word == 0, high, 0)), tl.sum(tl.where(word == 1, high, 0)),
            tl.sum(tl.where(word == 2, high, 0)), tl.sum(tl.where(word == 3, high, 0)),
            tl.sum(tl.where(word == 0, low, 0)), tl.sum(tl.where(word == 1, low, 0)),
            tl.sum(tl.where(word == 2, low, 0)), tl.sum(tl.where(word == 3, low, 0)),
        )  # fmt: skip

    @triton.jit
    def _table_byte(nibble, first, second, third, fourth):
        """Byte `nibble % 4` of table word `nibble // 4`: what one prmt lookup reads, in plain shifts."""
        word = tl.where(nibble < 8, tl.where(nibble < 4, first, second), tl.where(nibble < 12, third, fourth))
        return (word >> (8 * (nibble % 4))) & 0xFF

    @triton.jit
    def _code_emulated(words, tables, position: tl.constexpr):
        """16-bit code of element `8w + position` of each word, from the table words."""
        nibble = (words >> (8 * (position // 2) + 4 * (1 - position % 2))) & 15
        high = _table_byte(nibble, tables[0], tables[1], tables[2], tables[3])
        return (high << 8) | _table_byte(nibble, tables[4], tables[5], tables[6], tables[7])

    @triton.jit
    def _pair_emulated(words, tables, pair: tl.constexpr):
        """What `PRMT_DECODE_PTX` writes to `$pair`, for the interpreter (which runs no PTX)."""
        return _code_emulated(words, tables, 2 * pair) | (_code_emulated(words, tables, 2 * pair + 1) << 16)

    @triton.jit
    def _halves(pair, DTYPE: tl.constexpr):
        """The two 16-bit codes of an int32 pair: (low half, high half) as `DTYPE`."""
        return pair.to(tl.int16).to(DTYPE, bitcast=True), (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True)

    @triton.jit
    def _decode_prmt(
        words, tables, COLUMNS: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, PTX: tl.constexpr
    ):
        """Codes `[BLOCK_N, COLUMNS]` in `DTYPE` of `words [BLOCK_N, COLUMNS / 8]`, by byte permutes."""
        if PTX:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(
                _PRMT_PTX,
                _PRMT_CONSTRAINTS,
                [
                    words,
                    tables[0],
                    tables[1],
                    tables[2],
                    tables[3],
                    tables[4],
                    tables[5],
                    tables[6],
                    tables[7],
                ],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True,
                pack=1,
            )
        else:
            p0, p1 = _pair_emulated(words, tables, 0), _pair_emulated(words, tables, 1)
            p2, p3 = _pair_emulated(words, tables, 2), _pair_emulated(words, tables, 3)
        c0, c1 = _halves(p0, DTYPE)
        c2, c3 = _halves(p1, DTYPE)
        c4, c5 = _halves(p2, DTYPE)
        c6, c7 = _halves(p3, DTYPE)
        # [BLOCK_N, words, 2, 2, 2], index [.., i, j, l] = element 8w + 4l + 2j + i: joins keep a word's
        # eight codes in one thread, in order, for one 128-bit store on their way to the tensor cores
        codes = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
        return tl.reshape(tl.permute(codes, (0, 1, 4, 3, 2)), (BLOCK_N, COLUMNS))

    @triton.jit
    def absmax(
        absmax_ptr, absmax2_ptr, code2_ptr, offset, block, mask,
        NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ):  # fmt: skip
        """fp32 absmax of quantisation blocks `block` (int32, any shape), as `dequantize_4bit` computes it."""
        if NESTED:  # code2[q] * absmax2[block // nested blocksize] + offset, in fp32
            quantised = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + block.to(tl.uint32) // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            scale = tl.load(code2_ptr + quantised) * scale2 + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return scale
