"""What programmatic dependent launch (vrft.kernels.launch_order) buys on the packed engine's kernel chain.

The 7B decode step's MLP input chain, 28 times over as in 28 decoder layers, in one CUDA graph as the engine
replays it: RMSNorm (`add_rms_norm`), `x A^T` (`lora_input`, rank 64 for gate and up), the gate/up 4-bit
matmul with the LoRA term. Timed three ways: every launch after the last has drained (`serial`), with
programmatic launch (`pdl`: each kernel's start overlaps the last one's end), and with the 4-bit kernel's
K loop also running beside `lora_input` (`pdl_x_ready`, what the engine does). Each chain is also timed
without its `lora_input` (and without the LoRA term), the time the overlap could hide at best, and once with
the LoRA term but no `lora_input` launch (`pdl_x_ready_lora_term_only`). Each chain also runs with nf4_mma's
`x_shared` off (`_x_shared_off`); on by default, `launch` applies it only where the kernel waits for x (not
with `x_ready`). Before it was on by default (results/x_shared_overlap_call/) the variant was `_x_shared`,
the same chains with it on.

    python bench/rollout/launch_overlap.py --out $OUT/launch_overlap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import bitsandbytes.functional as bnb_functional
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_sweep import time_us  # noqa: E402

from vrft.kernels import launch_order, nf4_mma  # noqa: E402
from vrft.kernels.decode_fusions import add_rms_norm  # noqa: E402
from vrft.kernels.lora_input import lora_input  # noqa: E402

LAYERS, ROWS, HIDDEN, GATE_UP, RANK = 28, 16, 3584, 2 * 18944, 64
# name suffix -> switches of nf4_mma's defaults the chain runs with
DEFAULTS_VARIANTS = {"": {}, "_x_shared_off": {"x_shared": 0}}


def chain(with_lora: bool, x_ready: bool, launch_lora_input: bool = True):
    """One replayable call of the 28-layer chain (weights shared across layers: L2 holds none of 38 MB);
    without `launch_lora_input`, the LoRA term reads an `x A^T` computed once, outside the chain."""
    torch.manual_seed(0)
    weight = torch.randn(GATE_UP, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    hidden = torch.randn(ROWS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    lora_a = torch.randn(2 * RANK, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    lora_b = torch.randn(GATE_UP, 2 * RANK, device="cuda", dtype=torch.bfloat16) * 0.02

    product = lora_input(hidden, lora_a)

    def call():
        out = None
        for _ in range(LAYERS):
            x = add_rms_norm(hidden, None, norm, 1e-6)[1]
            if with_lora:
                lora_in = lora_input(x, lora_a) if launch_lora_input else product
                first = (packed, state, None, lora_b)
                out = nf4_mma.launch(
                    first, (GATE_UP,), None, 2 * RANK, x, lora_in, 1.0, None, x_ready=x_ready
                )
            else:
                out = nf4_mma.launch((packed, state, None, None), (GATE_UP,), None, 0, x, None, 1.0, None)
        return out

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "us_per_chain": {}}
    for name, programmatic, with_lora, x_ready, launch_lora_input in (
        ("serial", False, True, False, True),
        ("pdl", True, True, False, True),
        ("pdl_x_ready", True, True, True, True),
        ("pdl_x_ready_lora_term_only", True, True, True, False),  # the LoRA term without lora_input
        ("serial_without_lora", False, False, False, True),
        ("pdl_without_lora", True, False, False, True),
    ):
        for suffix, choices in DEFAULTS_VARIANTS.items():
            defaults = {**nf4_mma.MMA_DEFAULTS, **choices}
            with (
                mock.patch.object(launch_order, "PROGRAMMATIC", programmatic),
                mock.patch.object(nf4_mma, "MMA_DEFAULTS", defaults),
            ):
                result["us_per_chain"][name + suffix] = time_us(
                    chain(with_lora, x_ready, launch_lora_input), [()]
                )  # replayed in a CUDA graph
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, us in result["us_per_chain"].items():
        print(f"{name:28s} {us:8.1f} us per {LAYERS} layers ({us / LAYERS:.1f} a layer)")


if __name__ == "__main__":
    main()
