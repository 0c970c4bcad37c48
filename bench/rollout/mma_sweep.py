"""The shared-memory-free Gluon kernel (`vrft.kernels.nf4_mma`) against `nf4_matmul`'s on the 7B projections.

    python bench/rollout/mma_sweep.py --out mma_sweep.json [--rows 16 8 32] [--budget-s 240]

Per shape: each variant checked against bitsandbytes' dequantise-then-matmul (worst |error| / max |output|,
next to the Triton kernel's), then timed as `kernel_sweep.py` times (CUDA-graph replays over weight copies
that add up to 3x the L2, so each call reads HBM), with `nf4_matmul` at its `DEFAULTS` and cuBLAS on a bf16
copy in the same run. Then the best variant per decoder layer at every `--rows`. JSON to `--out`, log beside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernel_sweep import LAYERS, PER_LAYER, SHAPES_7B, Log, copies_for, fraction, relative_error, time_us  # noqa: E402

from vrft.kernels import nf4_matmul  # noqa: E402
from vrft.kernels.nf4_matmul import reference_matmul  # noqa: E402
from vrft.kernels.nf4_mma import launch_config, matmul_4bit_mma  # noqa: E402

DEVICE = torch.device("cuda")
# Two sweeps on the H200 (2026-12-05): results/mma_call/ (tiles, blocks a step, K split, two steps an
# iteration) and results/mma_ring_call/ (a cp.async ring of shared-memory slots for the codes, 1- and 2-warp
# programs; the ring and the two-step iteration lost everywhere and were removed after c592d5b). This one:
# register caps that let more programs share a multiprocessor (ptxas spills none in the K loop at these).
BASE = {"BLOCK_N": 64, "BLOCKS": 4, "num_warps": 4, "programs_per_sm": 8, "maxnreg": 128}
VARIANTS = [
    BASE,
    *({**BASE, "BLOCKS": 1, "maxnreg": r, "programs_per_sm": p} for r in (64, 80) for p in (8, 16)),
    *({**BASE, "BLOCKS": 2, "maxnreg": r, "programs_per_sm": p} for r in (80, 96) for p in (8, 16)),
    {**BASE, "maxnreg": 96},
    *(
        {**BASE, "BLOCK_N": 32, "num_warps": 2, "BLOCKS": 2, "maxnreg": 80, "programs_per_sm": p}
        for p in (16, 24)
    ),
    {**BASE, "BLOCK_N": 32, "num_warps": 2, "BLOCKS": 1, "maxnreg": 64, "programs_per_sm": 16},
]


def weights(name: str, copies: int):
    out_features, in_features = SHAPES_7B[name]
    result = []
    for seed in range(copies):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        w = (
            torch.randn(out_features, in_features, device=DEVICE, generator=generator).to(torch.bfloat16)
            * 0.02
        )
        packed, state = bnb_functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        result.append((packed, state))
        del w
    return result


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
    x = torch.randn(max(args.rows), 18944, device=DEVICE, dtype=torch.bfloat16)
    per_shape = {}
    for name in SHAPES_7B:
        out_features, in_features = SHAPES_7B[name]
        sets = weights(name, copies_for(out_features * in_features // 2, False))
        xs = x[:rows, :in_features].contiguous()
        reference = reference_matmul(xs, *sets[0])
        old_config = nf4_matmul.launch_config(rows, out_features, in_features, 64, DEVICE)  # its own kernel
        old = nf4_matmul.matmul_4bit(xs, *sets[0], config=old_config)
        dense = bnb_functional.dequantize_4bit(*sets[0]).to(torch.bfloat16)
        old_us = time_us(nf4_matmul.matmul_4bit, [(xs, *w) for w in sets], config=old_config)
        dense_us = time_us(F.linear, [(xs, dense)])
        results["baseline"][name] = {
            "triton_us": old_us, "triton_bound": fraction(name, old_us), "triton_error": relative_error(old, reference),
            "cublas_bf16_warm_us": dense_us,
        }  # fmt: skip
        log(f"{name} rows {rows}: nf4_matmul {old_us:.1f} us ({fraction(name, old_us):.1%} of bound), "
            f"error {relative_error(old, reference):.4f}")  # fmt: skip
        per_shape[name] = (sets, xs, reference)
        del dense
    for variant in VARIANTS:
        if time.monotonic() - started > args.budget_s:
            log("budget spent; variants left untimed")
            break
        key = json.dumps(variant, sort_keys=True)
        entry = {}
        for name, (sets, xs, reference) in per_shape.items():
            out_features, in_features = SHAPES_7B[name]
            try:
                config = launch_config(rows, out_features, in_features, DEVICE, **variant)
                y = matmul_4bit_mma(xs, *sets[0], config=config)
                torch.cuda.synchronize()
            except Exception as error:  # recorded, not fatal: the sweep goes on
                entry[name] = {"failed": f"{type(error).__name__}: {str(error)[:300]}"}
                continue
            error = relative_error(y, reference)
            calls = [(xs, *w) for w in sets]
            us = time_us(matmul_4bit_mma, calls, config=config) if error < 0.02 else None
            entry[name] = {"us": us, "error": error, "split_k": config["SPLIT_K"]}
        layer = sum(PER_LAYER[n] * entry[n]["us"] for n in entry if entry[n].get("us")) if all(
            entry.get(n, {}).get("us") for n in SHAPES_7B) else None  # fmt: skip
        results["variants"][key] = {"shapes": entry, "per_layer_us": layer}
        log(
            key,
            "per layer",
            None if layer is None else round(layer, 1),
            {
                n: (round(e["us"], 1), e["split_k"], round(e["error"], 4)) if e.get("us") else e
                for n, e in entry.items()
            },
        )
        args.out.write_text(json.dumps(results, indent=1))
    old_layer = sum(PER_LAYER[n] * results["baseline"][n]["triton_us"] for n in SHAPES_7B)
    timed = {k: v for k, v in results["variants"].items() if v["per_layer_us"]}
    if timed:
        best = min(timed, key=lambda k: timed[k]["per_layer_us"])
        results["best"] = {"variant": json.loads(best), "per_layer_us": timed[best]["per_layer_us"],
                           "nf4_matmul_per_layer_us": old_layer}  # fmt: skip
        log(
            f"best {best}: {timed[best]['per_layer_us']:.1f} us per layer against nf4_matmul's {old_layer:.1f} "
            f"({LAYERS} layers: {LAYERS * timed[best]['per_layer_us'] / 1e3:.2f} ms against {LAYERS * old_layer / 1e3:.2f})"
        )
        for name in SHAPES_7B:
            us = timed[best]["shapes"][name]["us"]
            log(
                f"  {name}: {us:.1f} us, {fraction(name, us):.1%} of the bound (nf4_matmul "
                f"{results['baseline'][name]['triton_us']:.1f})"
            )
        for other_rows in args.rows[1:]:
            line = {}
            for name, (sets, _, _) in per_shape.items():
                out_features, in_features = SHAPES_7B[name]
                xs = x[:other_rows, :in_features].contiguous()
                config = launch_config(other_rows, out_features, in_features, DEVICE, **json.loads(best))
                error = relative_error(
                    matmul_4bit_mma(xs, *sets[0], config=config), reference_matmul(xs, *sets[0])
                )
                new = time_us(matmul_4bit_mma, [(xs, *w) for w in sets], config=config)
                old_config = nf4_matmul.launch_config(other_rows, out_features, in_features, 64, DEVICE)
                old = time_us(nf4_matmul.matmul_4bit, [(xs, *w) for w in sets], config=old_config)
                line[name] = {"mma_us": new, "nf4_matmul_us": old, "error": error}
            results["best"][f"rows_{other_rows}"] = line
            log(
                f"rows {other_rows}:",
                {n: (round(v["mma_us"], 1), round(v["nf4_matmul_us"], 1)) for n, v in line.items()},
            )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
