"""The shared-memory-free Gluon kernel (`vrft.kernels.nf4_mma`) against `nf4_matmul`'s on the 7B projections.

    python bench/rollout/mma_sweep.py --out mma_sweep.json [--rows 16 8 32] [--budget-s 240]

Per shape: each variant checked against bitsandbytes' dequantise-then-matmul, then timed, by
`kernel_sweep.py`'s `measure` (CUDA-graph replays over weight copies that add up to 3x the L2, so each call
reads HBM), with `nf4_matmul` at its `DEFAULTS` in the same run. Then the best variant per decoder layer
against `nf4_matmul` at every other `--rows`. JSON to `--out`, log beside. (The runs in results/mma_call/
and mma_ring_call/ were made before this script used `measure`: their JSON has its own field names.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_sweep import (  # noqa: E402
    LAYERS,
    SHAPES_7B,
    Log,
    fraction,
    layer_us,
    make_cases,
    measure,
    packed_copies,
)

from vrft.kernels import nf4_matmul  # noqa: E402
from vrft.kernels.nf4_mma import MMA_DEFAULTS, PLAIN_LOADS, launch_config, matmul_4bit_mma  # noqa: E402

DEVICE = torch.device("cuda")
# Two sweeps on the H200 (2026-12-05): results/mma_call/ (tiles, blocks a step, K split, two steps an
# iteration) and results/mma_ring_call/ (a cp.async ring of shared-memory slots for the codes, 1- and 2-warp
# programs; the ring and the two-step iteration lost everywhere and were removed after c592d5b). This one:
# - the absmax of a step as one word a row, loaded a step ahead (`absmax_words`), and an L2 prefetch of the
#   codes `prefetch` steps ahead. In the sm_90 SASS (`nf4_offline.compile_mma`) the one-step-ahead code loads sit
#   ~4/5 into the step without a prefetch (ptxas sinks them) and at its top with one (prefetch 1 asks L2 for
#   what the loads read anyway: it only pins them); and rows past the ends read the last row instead of
#   masked loads (`clamp_rows`: 664 instructions a step become 604, sm_90). None spills at 128 registers
#   (sm_90, sm_89; bench/rollout/mma_loads.py);
# - register caps that let more programs share a multiprocessor: with clamped rows, 2 blocks a step fit 80
#   registers (6 programs) and 1 block 64 (8) with no spill, the absmax words too at 80 (the prefetch
#   spills at these caps); the older caps (without clamped rows) spill a few bytes in segments launches.
BASE = {**MMA_DEFAULTS, **PLAIN_LOADS}  # the variants are changes to the kernel with its load variants off
# one-warp programs of 32 rows: a warp reads 128 columns of x a step for 32 weight rows instead of 256 for
# 16 (4 KB of x to 2 KB of codes, against 8 to 2), and 16 programs share a multiprocessor with no spill
ONE_WARP = {**BASE, "BLOCK_N": 32, "num_warps": 1, "BLOCKS": 2, "clamp_rows": True}
VARIANTS = [
    BASE,
    *(
        {**BASE, "clamp_rows": clamp, "absmax_words": words, "prefetch": ahead}
        for clamp in (False, True)
        for words in (False, True)
        for ahead in (0, 1, 2, 4)
        if clamp or words or ahead
    ),
    *({**BASE, "clamp_rows": True, "programs_per_sm": 16}, {**BASE, "programs_per_sm": 16}),
    *(
        {**ONE_WARP, "absmax_words": words, "prefetch": ahead, "programs_per_sm": p}
        for words, ahead, p in ((False, 0, 16), (False, 0, 32), (True, 0, 32), (False, 1, 32))
    ),
    *(
        {**BASE, "clamp_rows": True, "absmax_words": words, "BLOCKS": 2, "maxnreg": 80, "programs_per_sm": p}
        for words in (False, True)
        for p in (8, 12, 16)
    ),
    *({**BASE, "clamp_rows": True, "BLOCKS": 1, "maxnreg": 64, "programs_per_sm": p} for p in (8, 16)),
    *({**BASE, "BLOCKS": 1, "maxnreg": r, "programs_per_sm": p} for r in (64, 80) for p in (8, 16)),
    *({**BASE, "BLOCKS": 2, "maxnreg": r, "programs_per_sm": p} for r in (80, 96) for p in (8, 16)),
    {**BASE, "maxnreg": 96},
    *(
        {**BASE, "BLOCK_N": 32, "num_warps": 2, "BLOCKS": 2, "maxnreg": 80, "programs_per_sm": p}
        for p in (16, 24)
    ),
    {**BASE, "BLOCK_N": 32, "num_warps": 2, "BLOCKS": 1, "maxnreg": 64, "programs_per_sm": 16},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 8, 32])
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args()
    log = Log(args.out.with_suffix(".log"))
    started = time.monotonic()
    results = {"variants": {}, "baseline": {}, "best": {}}
    rows = args.rows[0]
    torch.manual_seed(0)
    weights = {name: {"copies": packed_copies(*shape, warm_l2=False)[1]} for name, shape in SHAPES_7B.items()}
    cases = make_cases(rows, weights)
    for name, case in cases.items():
        result = measure(case, nf4_matmul.launch_config(rows, *SHAPES_7B[name], 64, DEVICE))  # its own kernel
        results["baseline"][name] = result
        log(
            f"{name} rows {rows}: nf4_matmul {result['us']:.1f} us ({fraction(name, result['us']):.1%} of the bound)"
        )
    for variant in VARIANTS:
        if time.monotonic() - started > args.budget_s:
            log("budget spent; variants left untimed")
            break
        entry = {}
        for name, case in cases.items():
            config = launch_config(rows, *SHAPES_7B[name], DEVICE, **variant)
            entry[name] = {**measure(case, config, kernel=matmul_4bit_mma), "split_k": config["SPLIT_K"]}
        key = json.dumps(variant, sort_keys=True)
        results["variants"][key] = {"shapes": entry, "per_layer_us": layer_us(entry)}
        cells = {
            n: (round(e["us"], 1), e["split_k"], round(e.get("error", math.nan), 4)) for n, e in entry.items()
        }
        failures = {n: e["failure"] for n, e in entry.items() if "failure" in e}
        log(key, "per layer", round(layer_us(entry), 1), cells, failures or "")
        args.out.write_text(json.dumps(results, indent=1))
    old_layer = layer_us(results["baseline"])
    timed = {k: v for k, v in results["variants"].items() if math.isfinite(v["per_layer_us"])}
    if timed:
        best = min(timed, key=lambda k: timed[k]["per_layer_us"])
        layer = timed[best]["per_layer_us"]
        results["best"] = {
            "variant": json.loads(best),
            "per_layer_us": layer,
            "nf4_matmul_per_layer_us": old_layer,
        }
        log(
            f"best {best}: {layer:.1f} us per layer against nf4_matmul's {old_layer:.1f} "
            f"({LAYERS} layers: {LAYERS * layer / 1e3:.2f} ms against {LAYERS * old_layer / 1e3:.2f})"
        )
        for name in SHAPES_7B:
            us = timed[best]["shapes"][name]["us"]
            log(
                f"  {name}: {us:.1f} us, {fraction(name, us):.1%} of the bound (nf4_matmul "
                f"{results['baseline'][name]['us']:.1f})"
            )
        for other_rows in args.rows[1:]:
            line = {}
            for name, case in make_cases(other_rows, weights).items():
                config = launch_config(other_rows, *SHAPES_7B[name], DEVICE, **json.loads(best))
                old_config = nf4_matmul.launch_config(other_rows, *SHAPES_7B[name], 64, DEVICE)
                line[name] = {
                    "mma": measure(case, config, kernel=matmul_4bit_mma),
                    "nf4_matmul": measure(case, old_config),
                }
            results["best"][f"rows_{other_rows}"] = line
            log(
                f"rows {other_rows}:",
                {n: (round(v["mma"]["us"], 1), round(v["nf4_matmul"]["us"], 1)) for n, v in line.items()},
            )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
