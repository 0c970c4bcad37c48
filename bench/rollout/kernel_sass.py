"""Instructions per weight in the fused 4-bit kernel's main loop, per variant, compiled for sm_90 on the CPU.

    python bench/rollout/kernel_sass.py --out kernel_sass.json      # needs only the Triton wheel, no GPU

A static count (`vrft.kernels.nf4_offline`), not a timing: per thread and per decoded weight, all SASS
instructions of the K loop, those of the integer ALU pipe (`PRMT`, `LOP3`, `SHF`, `LEA`, `IADD3`, `ISETP`,
`SEL`), and those that go through the shared-memory / shuffle unit (`LDS`, `STS`, `LDSM`, `SHFL`). At the
H200's 4.8 TB/s a Qwen2-VL-7B projection at 40% of the bound leaves ~8 instructions per weight (4 issued
per SM per cycle) and ~4 integer-ALU ones (64 lanes per SM per cycle); the first kernel's way takes ~10.7.
"""

from __future__ import annotations

import argparse
import json

from vrft.kernels.nf4_offline import compile_kernel, main_loop_opcodes, registers, sass

INTEGER_ALU = ("PRMT", "LOP3", "SHF", "LEA", "IADD3", "ISETP", "SEL", "IMNMX", "VIADD")
SHARED_MEMORY = ("LDS", "STS", "LDSM", "SHFL")
VARIANTS = {  # name: launch-config overrides, each naming its decoder and scaling (DEFAULTS fill the rest)
    "words, scale per weight (the first kernel's way)": {"DECODE": 0, "SCALE_AFTER": 0},
    "words, scale after": {"DECODE": 0, "SCALE_AFTER": 1},
    "bytes, scale per weight": {"DECODE": 1, "SCALE_AFTER": 0},
    "bytes, scale after": {"DECODE": 1, "SCALE_AFTER": 1},
    "prmt": {"DECODE": 2, "SCALE_AFTER": 1},
    "prmt, BLOCK_N 128": {"DECODE": 2, "SCALE_AFTER": 1, "BLOCK_N": 128},
    "prmt, BLOCK_N 128, BLOCK_K 256": {"DECODE": 2, "SCALE_AFTER": 1, "BLOCK_N": 128, "BLOCK_K": 256},
    "prmt, BLOCK_N 256": {"DECODE": 2, "SCALE_AFTER": 1, "BLOCK_N": 256},
    "prmt, x left (TRANSPOSED 0)": {"DECODE": 2, "SCALE_AFTER": 1, "TRANSPOSED": 0},
}


def per_weight(overrides: dict, rows_block: int) -> dict:
    """Instruction counts per thread and decoded weight of one variant (16 decode rows: BLOCK_M 16)."""
    config = {"BLOCK_M": rows_block, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, **overrides}
    compiled = compile_kernel(config)
    opcodes = main_loop_opcodes(sass(compiled))
    weights = config["BLOCK_N"] * config["BLOCK_K"] / (32 * config["num_warps"])  # per thread per loop step
    return {
        **registers(compiled),
        "all": round(sum(opcodes.values()) / weights, 2),
        "integer_alu": round(sum(opcodes[op] for op in INTEGER_ALU) / weights, 2),
        "shared_memory": round(sum(opcodes[op] for op in SHARED_MEMORY) / weights, 2),
        "opcodes": dict(opcodes.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-m", type=int, default=16)
    args = parser.parse_args()
    counts = {}
    for name, overrides in VARIANTS.items():
        counts[name] = per_weight(overrides, args.block_m)
        row = counts[name]
        print(
            f"{name:48s} {row['all']:6.2f} {row['integer_alu']:6.2f} {row['shared_memory']:6.2f}"
            f" {row['registers']:4d} regs {row['programs_per_sm']} programs/SM",
            flush=True,
        )
    with open(args.out, "w") as handle:
        json.dump(counts, handle, indent=1)


if __name__ == "__main__":
    main()
