"""Where `nf4_mma`'s K loop issues its loads, per variant, in the machine code (no GPU needed).

    PYTHONPATH=<a Triton 3.6 install> python bench/rollout/mma_loads.py [--arch 90] [--rows 16] [--split-k 4]

Compiles the kernel for gate/up of the 7B model (`nf4_offline.compile_mma`, the wheel's own ptxas) with each
load variant of `mma_sweep.py` and prints, for the K loop, its instruction count, its global loads, and
where each kind of load sits, as % of the loop's instructions. Loads are told apart by width: 8-byte loads
are the next step's packed codes, 16-byte ones `x`, bytes the quantised absmax, 4-byte ones the rest (absmax
words, second-level scales, code-book entries). It says nothing about time: the sweep times the variants.
"""

from __future__ import annotations

import argparse

import torch

from vrft.kernels import nf4_mma
from vrft.kernels.nf4_offline import compile_mma, main_loop, mnemonic, opcode, registers, sass

VARIANTS = {  # changes to the kernel with the three load variants off (`nf4_mma.PLAIN_LOADS`)
    "plain": {},
    "prefetch 1": {"prefetch": 1},
    "absmax_words": {"absmax_words": True},
    "both (prefetch 2)": {"absmax_words": True, "prefetch": 2},
    "clamp_rows": {"clamp_rows": True},
    "all three (prefetch 2)": {"absmax_words": True, "prefetch": 2, "clamp_rows": True},
}
KINDS = {"LDG.E.64": "codes", "LDG.E.128": "x", "LDG.E.U8": "absmax bytes", "LDG.E": "4-byte"}


def load_positions(loop: list[str]) -> dict[str, list[int]]:
    """Each kind of global load (`KINDS`) -> its positions in `loop`, as % of the loop's instructions."""
    positions: dict[str, list[int]] = {kind: [] for kind in KINDS.values()}
    for index, instruction in enumerate(loop):
        if opcode(instruction) == "LDG":
            positions[KINDS[mnemonic(instruction)]].append(100 * index // len(loop))
    return positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--split-k", type=int, default=4)
    args = parser.parse_args()
    # the K split the H200 (132 multiprocessors) gives gate/up at 16 rows; it decides the epilogue, whose
    # registers the loop shares (unsplit, `both` spills 8 bytes at 128 registers)
    config = nf4_mma.launch_config(args.rows, 18944, 3584, torch.device("meta"), **nf4_mma.PLAIN_LOADS)
    config["SPLIT_K"] = args.split_k
    for name, choices in VARIANTS.items():
        compiled = compile_mma({**config, **choices}, arch=args.arch)
        loop = main_loop(sass(compiled))
        positions = load_positions(loop)
        loads = sum(len(p) for p in positions.values())
        usage = registers(compiled)
        print(
            f"{name}: {len(loop)} instructions, {loads} loads, {usage['registers']} registers, "
            f"{usage['stack_bytes']} bytes spilled"
        )
        for kind, where in positions.items():
            if where:
                print(f"    {kind:>12}: {' '.join(map(str, where))}")


if __name__ == "__main__":
    main()
