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
from vrft.kernels.nf4_mma import MMA_DEFAULTS, launch_config, matmul_4bit_mma  # noqa: E402

DEVICE = torch.device("cuda")
# Earlier sweeps on the H200 (2026-12-05), each with this file's variant list at the commit results.md names:
# results/mma_call/ (tiles, blocks a step, K split, two steps an iteration), results/mma_ring_call/ (a
# cp.async ring of shared-memory slots for the codes, 1- and 2-warp programs; removed after c592d5b) and
# results/mma_words_call/ (the absmax words, L2 prefetch, clamped rows, register caps; the list at 5f521ef).
# The one before (thirteenth session, results/scales_ahead_call/, H100) ran at commit 192b4f4, whose kernel
# had a `scales_ahead` switch (each block's absmax code-book lookups a step before the step that multiplies
# by them): 122.8 us per decoder layer against the defaults' 120.5, so the switch was removed; taller tiles
# of more warps lost too (128.7 and 143.1). The next (results/absmax_shared_call/, H200, 418582d): every
# scale of a tile's K slice worked out once, kept in shared memory (`absmax_shared`), 113.9 against 120.4,
# now the default. The one before this (results/x_shared_call/, H100, 554e681): each program's K slice of x
# in shared memory (`x_shared`), then off: 108.3 us per layer at 32 KB against 115.7, 108.2 at 64 KB, 118.1
# at 16 KB, 107.2 at 32 KB with 4 programs a multiprocessor, 131.1 with two blocks a step (still off by
# default: MMA_DEFAULTS says why). This one, written while it was off: the defaults against x_shared at 32
# and 64 KB and with 4 programs a multiprocessor; x_shared is on by default (32 KB) since the sixteenth
# session, so the second variant is the one without it.
VARIANTS = [
    MMA_DEFAULTS,
    {**MMA_DEFAULTS, "x_shared": 0},
    {**MMA_DEFAULTS, "x_shared": 65536},
    {**MMA_DEFAULTS, "x_shared": 32768, "programs_per_sm": 4},
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
