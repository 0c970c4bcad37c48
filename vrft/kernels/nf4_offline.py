"""Compile the 4-bit kernels (`nf4_matmul`'s, `nf4_mma`'s) for a GPU architecture on a machine without one,
and read their machine code.

Why: the kernel's speed is decided by the instructions its main loop spends per weight, and the Triton
wheel carries the whole CUDA back end (ptxas, cuobjdump), so a CPU-only machine can build the sm_90 binary
of every variant, check that its inline PTX assembles and count its loop's SASS instructions. The
interpreter (tests/kernels) checks the values; this checks what the GPU would run. It says nothing about
timing: stalls, occupancy and memory are only seen on the device (bench/rollout/kernel_sweep.py).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vrft.kernels import nf4_mma
from vrft.kernels.nf4_decode import DECODE_BYTES
from vrft.kernels.nf4_matmul import DEFAULTS, KERNEL_SWITCHES, _matmul_4bit_kernel

H200 = GPUTarget("cuda", 90, 32)
_POINTERS = {  # kernel argument -> element type; "X" is the compute dtype
    "x_ptr": "X", "bias_ptr": "X", "lora_in_ptr": "X", "lora_b_ptr": "X", "y_ptr": "X",
    "code_ptr": "fp32", "absmax2_ptr": "fp32", "code2_ptr": "fp32", "offset_ptr": "fp32",
    "partial_ptr": "fp32", "counter_ptr": "i32", "segments_ptr": "i64",
}  # fmt: skip
_ALIGNED = ("K", "N", "stride_xm", "stride_ym")  # multiples of 16 on the Qwen shapes: Triton specialises them


def compile_kernel(
    config: dict,
    dtype: str = "bf16",
    nested: bool = True,
    blocksize: int = 64,
    even: bool = True,
    split: bool = True,
    target: GPUTarget = H200,
    bias: bool = False,
    lora_rank: int = 0,
    segments: int = 0,
):
    """The kernel compiled for `target` with launch config `config` (as `launch_config` returns it).

    `dtype` is "bf16" or "fp16"; the other arguments are the compile-time facts `matmul_4bit` derives from
    the weight and shape (`lora_rank` is the LORA_RANK constexpr: 0 or a multiple of 16; `segments` the
    number of weights of a `matmul_4bit_segments` launch, 0 for one weight). Returns Triton's compiled kernel (`.asm` holds "ttgir", "ptx", "cubin").
    """
    switches = {key: config.get(key, DEFAULTS[key]) for key in KERNEL_SWITCHES}
    num_warps, num_stages = switches.pop("num_warps"), switches.pop("num_stages")
    constants = {
        "BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256 if nested else 1, "NESTED": nested,
        "HAS_BIAS": bias, "LORA_RANK": lora_rank, "SEGMENTS": segments, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
        "BLOCK_K": config["BLOCK_K"], "SPLIT": split, "EVEN": even, "PTX": True, **switches,
        "PDL": target.arch >= 90,  # as a launch on that card: vrft.kernels.launch_order
    }  # fmt: skip
    pointers = {
        **_POINTERS,
        "packed_ptr": "u8" if switches["DECODE"] == DECODE_BYTES else "i32",
        "absmax_ptr": "u8" if nested else "fp32",
    }
    source = ASTSource(_matmul_4bit_kernel, *_signature(_matmul_4bit_kernel, constants, pointers, dtype))
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": target.arch >= 90}
    return triton.compile(source, target=target, options=options)


def compile_mma(config: dict, arch: int = 90, dtype: str = "bf16", nested: bool = True, bias: bool = False,
                lora_rank: int = 0, segments: int = 0, x_ready: bool = False,
                in_features: int = 3584, silu_pairs: bool = False):  # fmt: skip
    """`nf4_mma`'s kernel compiled for `sm_<arch>` with `config` (as `nf4_mma.launch_config` returns it);
    the other arguments as `compile_kernel`'s (`in_features`: K, which sets the K slice's length;
    `silu_pairs` as `nf4_mma.launch`'s)."""
    # as a launch finds them: the CUDA caching allocator starts each block 512-byte aligned
    constants = nf4_mma.kernel_constants(
        config, nested, 256 if nested else 1, bias, lora_rank, segments, True, in_features, silu_pairs
    ) | {"PDL": arch >= 90, "X_READY": x_ready}  # as a launch on that card: vrft.kernels.launch_order
    pointers = {
        **_POINTERS, "lora_b_ptr": "fp32", "packed_ptr": "i32", "absmax_ptr": "u8" if nested else "fp32",
    }  # fmt: skip
    return compile_gluon(nf4_mma._mma_4bit_kernel, constants, pointers, config["num_warps"], arch, dtype,
                         config.get("maxnreg"))  # fmt: skip


def compile_gluon(kernel, constants: dict, pointers: dict, num_warps: int, arch: int = 90, dtype: str = "bf16",
                  maxnreg: int | None = None):  # fmt: skip
    """A Gluon kernel compiled for `sm_<arch>` (Gluon has its own front end, `GluonASTSource`): `constants`
    its constexpr arguments, `pointers` each pointer argument's element type as `_signature` takes them."""
    from triton.experimental.gluon._runtime import GluonASTSource

    source = GluonASTSource(kernel, *_signature(kernel, constants, pointers, dtype))
    cap = {"maxnreg": maxnreg} if maxnreg else {}
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "launch_pdl": arch >= 90, **cap},
    )


def _signature(kernel, constants: dict, pointers: dict, dtype: str) -> tuple[dict, dict, dict]:
    """What Triton's front ends take besides the kernel: each argument's type (`pointers` maps a pointer
    argument to its element type, "X" the compute dtype `dtype`; the other scalars are i32 but `lora_scale`),
    `constants`, and the alignment hints: pointers and the Qwen shapes' sizes are multiples of 16, which
    Triton specialises on at run time too."""
    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constants
        else "*" + (dtype if pointers[name] == "X" else pointers[name]) if name in pointers
        else "fp32" if name == "lora_scale" else "i32"
        for name in names
    }  # fmt: skip
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in _ALIGNED}
    return signature, constants, aligned


def _cuobjdump(compiled, option: str) -> str:
    """What the cuobjdump that ships with Triton prints for the compiled kernel's cubin with `option`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, option, cubin.name], capture_output=True, text=True, check=True).stdout


def sass(compiled) -> str:
    """The compiled kernel's SASS."""
    return _cuobjdump(compiled, "-sass")


def registers(compiled) -> dict[str, int]:
    """Registers per thread and stack bytes (spills) of the compiled kernel, as cuobjdump reports them, and
    how many of its programs the registers let one multiprocessor hold (sm_80..sm_90: 64K per SM)."""
    usage = _cuobjdump(compiled, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    count = int(found.group(1))
    # what registers decide: programs per multiprocessor, of its 64K registers allocated 8 per thread at a time
    threads = 32 * compiled.metadata.num_warps
    return {
        "registers": count,
        "stack_bytes": int(found.group(2)),
        "programs_per_sm": 65536 // (-(-count // 8) * 8 * threads),
    }


def instructions(code: str) -> list[tuple[int, str]]:
    """`(address, text)` of each instruction of SASS `code` (`sass`), in program order."""
    listed = []
    for line in code.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if found:
            listed.append((int(found.group(1), 16), found.group(2).strip()))
    return listed


def main_loop(code: str) -> list[str]:
    """The instructions of the longest loop in `code` that runs tensor-core MMAs, in order.

    The loop is found as a backward branch whose body holds an (H)GMMA or HMMA: the K loop of the kernel.
    """
    listed = instructions(code)
    longest: list[str] = []
    for address, text in listed:
        branch = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            body = [t for a, t in listed if int(branch.group(1), 16) <= a <= address]
            if any("MMA" in t for t in body) and len(body) > len(longest):
                longest = body
    return longest


def mnemonic(instruction: str) -> str:
    """`PRMT`, `LDG.E.64`, ... of one instruction's text: its opcode with modifiers, the predicate dropped."""
    return re.match(r"^(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", instruction).group(1)


def opcode(instruction: str) -> str:
    """`PRMT`, `LDG`, ... of one instruction's text: its mnemonic without modifiers."""
    return mnemonic(instruction).split(".")[0]


def main_loop_opcodes(code: str) -> collections.Counter:
    """Opcode counts (`PRMT`, `LOP3`, `SHFL`, ...) of the K loop (`main_loop`)."""
    return collections.Counter(opcode(text) for text in main_loop(code))
