"""The byte-permute decoder's PTX, run by a model of its five instructions, and every kernel variant compiled.

The interpreter runs no inline PTX (there the kernel reads the same table words with shifts), so the PTX
itself is checked here: the exact string the kernel embeds is executed instruction by instruction on numpy
words, as the PTX ISA defines `and`, `shl`, `shr`, `lop3` and `prmt` (default mode), and must return every
code of every nibble position. Compiling for sm_90 (Triton ships ptxas) then checks it assembles.
"""

import importlib.util
import re

import numpy as np
import pytest
import torch

from vrft.kernels.nf4_decode import PRMT_DECODE_PTX

bnb_functional = pytest.importorskip("bitsandbytes.functional")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def prmt(a: np.ndarray, b: np.ndarray, selector: np.ndarray) -> np.ndarray:
    """PTX `prmt.b32 d, a, b, c` (default mode): byte k of d is byte (c >> 4k) & 7 of {b, a}, or its sign."""
    source = (np.uint64(b) << np.uint64(32)) | np.uint64(a)
    result = np.zeros(np.broadcast(a, b, selector).shape, dtype=np.uint32)
    for k in range(4):
        nibble = (selector >> np.uint32(4 * k)) & np.uint32(15)
        byte = (
            (source >> (np.uint64(8) * (nibble & np.uint32(7)).astype(np.uint64))) & np.uint64(0xFF)
        ).astype(np.uint32)
        sign = np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0))
        result |= np.where(nibble & np.uint32(8), sign, byte) << np.uint32(8 * k)
    return result


def lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, table: int) -> np.ndarray:
    """PTX `lop3.b32`: bit i of d is bit (4 a_i + 2 b_i + c_i) of `table` (a = 0xF0, b = 0xCC, c = 0xAA)."""
    result = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for index in range(8):
        if table >> index & 1:
            result |= (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
    return result


def run_ptx(ptx: str, operands: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the straight-line PTX block on uint32 arrays; `operands` maps "$4" etc. to inputs."""
    registers = dict(operands)

    def value(token: str) -> np.ndarray:
        token = token.strip()
        return np.uint32(int(token, 16)) if token.startswith("0x") else registers[token]

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        destination, *sources = [token.strip() for token in rest.split(",")]
        if opcode == "and.b32":
            registers[destination] = value(sources[0]) & value(sources[1])
        elif opcode == "shl.b32":
            registers[destination] = value(sources[0]) << np.uint32(int(sources[1]))
        elif opcode == "shr.u32":
            registers[destination] = value(sources[0]) >> np.uint32(int(sources[1]))
        elif opcode == "prmt.b32":
            registers[destination] = prmt(value(sources[0]), value(sources[1]), value(sources[2]))
        elif opcode == "lop3.b32":
            registers[destination] = lop3(*(value(s) for s in sources[:3]), int(sources[3], 16))
        else:
            raise AssertionError(
                f"the model knows no {opcode!r}: extend it with the instruction's PTX definition"
            )
    return registers


def table_words(codes: np.ndarray) -> list[np.uint32]:
    """`byte_tables` on the host: 16-bit codes -> high bytes of entries 0-3 .. 12-15, then low bytes."""
    words = []
    for plane in (codes >> 8, codes & 0xFF):
        for quarter in range(4):
            words.append(np.uint32(sum(int(plane[4 * quarter + i]) << (8 * i) for i in range(4))))
    return words


def test_the_ptx_uses_only_modelled_instructions():
    opcodes = {line.split()[0] for line in PRMT_DECODE_PTX.splitlines() if re.match(r"^[a-z]", line.strip())}
    assert opcodes <= {"and.b32", "shl.b32", "shr.u32", "prmt.b32", "lop3.b32"}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_byte_permute_ptx_decodes_every_nibble_in_storage_order(quant_type, dtype):
    codes = bnb_functional.get_4bit_type(quant_type, device="cpu").to(dtype).view(torch.int16).numpy()
    codes = codes.astype(np.uint32) & 0xFFFF
    low = np.arange(1 << 16, dtype=np.uint32)  # every lower half, paired with a scrambled upper half
    words = low | (((low * np.uint32(40503)) & np.uint32(0xFFFF)) << np.uint32(16))
    operands = {"$4": words, **{f"${5 + i}": word for i, word in enumerate(table_words(codes))}}
    registers = run_ptx(PRMT_DECODE_PTX, operands)
    for pair in range(4):
        for half in range(2):
            position = 2 * pair + half  # element 8w + position: byte position // 2, high nibble if even
            nibble = (words >> np.uint32(8 * (position // 2) + 4 * (1 - position % 2))) & np.uint32(15)
            decoded = (registers[f"${pair}"] >> np.uint32(16 * half)) & np.uint32(0xFFFF)
            np.testing.assert_array_equal(decoded, codes[nibble], err_msg=f"element {position}")


@needs_triton
@pytest.mark.parametrize(
    "overrides",
    [
        {"DECODE": 0, "SCALE_AFTER": 0},  # named in full: DEFAULTS moves with the sweep
        {"DECODE": 0, "SCALE_AFTER": 1},
        {"DECODE": 1, "SCALE_AFTER": 0},
        {"DECODE": 1, "SCALE_AFTER": 1, "GATHER": 0},
        {"DECODE": 2, "SCALE_AFTER": 1},
        {"DECODE": 2, "SCALE_AFTER": 1, "TRANSPOSED": 0, "BLOCK_N": 128, "BLOCK_K": 256},
    ],
)
def test_every_variant_compiles_for_sm90_and_its_loop_has_tensor_core_mmas(overrides):
    # Triton lowers to the device's layouts and ptxas assembles the inline PTX: what the interpreter skips.
    from vrft.kernels.nf4_offline import compile_kernel, main_loop_opcodes, sass

    config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, **overrides}
    compiled = compile_kernel(config, dtype="fp16" if overrides.get("GATHER") == 0 else "bf16", even=False)
    opcodes = main_loop_opcodes(sass(compiled))
    assert opcodes["HGMMA"] + opcodes["HMMA"] > 0, opcodes
    if overrides.get("DECODE") == 2:  # decoded by byte permutes: no shuffle, no per-weight 16-bit stores
        assert opcodes["PRMT"] > 0 and opcodes["SHFL"] == 0, opcodes


@needs_triton
def test_the_fused_lora_term_adds_no_spills_and_few_registers_to_the_default_kernel():
    # The LoRA epilogue shares the kernel's register budget: at rank 64 in one dot it took the kernel to the
    # 255-register cap with 192 bytes of spills, which cut the K loop's occupancy (the in-model decode step
    # spent 6.1 ms in the kernel against 4.1 in the sweep without LoRA). In chunks of 16 ranks it stays at
    # ~1.3x the kernel without LoRA (126 -> 168 registers at the 16-row DEFAULTS), with no spills.
    from vrft.kernels.nf4_matmul import DEFAULTS, launch_config
    from vrft.kernels.nf4_offline import compile_kernel, registers

    config = launch_config(16, 18944, 3584, 64, torch.device("cpu"))
    plain = registers(compile_kernel(config))
    with_lora = registers(compile_kernel(config, bias=True, lora_rank=64))
    assert DEFAULTS["SCALE_AFTER"] == config["SCALE_AFTER"]
    assert with_lora["stack_bytes"] == 0 and plain["stack_bytes"] == 0, (plain, with_lora)
    assert with_lora["registers"] <= 1.4 * plain["registers"], (plain, with_lora)
