"""Time the fused 4-bit matmul on Qwen2-VL-7B's projection shapes against dequantise-then-matmul and bf16.

    python bench/rollout/kernel_sweep.py --out kernel_sweep.json [--rows 16] [--sweep]

Per shape: microseconds per call (CUDA-graph replay of 20 calls, `triton.testing.do_bench_cudagraph`), the
packed bytes it must read (codes + uint8 absmax + the second-level scales) and that over the time as a
fraction of the H200's 4.8 TB/s. `--sweep` also tries, at the first `--rows`, tile sizes, the code-book
lookup, the operand order and warps (stage one), then K splits and pipeline stages around the fastest
(stage two), and records every timing; `launch_config`'s `DEFAULTS` are set from that sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json

import bitsandbytes.functional as bnb_functional
import torch
import triton
from torch.nn import functional as F

from vrft.kernels.nf4_matmul import launch_config, matmul_4bit, reference_matmul

BANDWIDTH = 4.8e12  # H200 datasheet, bytes/s
SHAPES_7B = {  # name: (out_features, in_features); per decoder layer, 28 layers; the largest first
    "gate_up": (18944, 3584),
    "down": (3584, 18944),
    "q_o": (3584, 3584),
    "k_v": (512, 3584),
}
PER_LAYER = {"q_o": 2, "k_v": 2, "gate_up": 2, "down": 1}


def packed_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    blocks = out_features * in_features // blocksize
    return out_features * in_features // 2 + blocks + blocks // 256 * 4


def time_us(fn, *args, **kwargs) -> float:
    """Microseconds per `fn(*args, **kwargs)`, replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(lambda: fn(*args, **kwargs), rep=20) * 1e3


def sweep_configs(rows: int, out_features: int, in_features: int):
    """Stage one: tile shapes, the code-book lookup, operand order and warps, at launch_config's K split."""
    for block_n, block_k, gather, transposed, warps in itertools.product(
        (64, 128), (128, 256), (0, 1), (0, 1), (4, 8)
    ):
        choices = {"BLOCK_N": block_n, "BLOCK_K": block_k, "GATHER": gather, "TRANSPOSED": transposed}
        yield launch_config(
            rows, out_features, in_features, 64, torch.device("cuda"), **choices, num_warps=warps
        )


def refine_configs(best: dict, in_features: int):
    """Stage two, around a stage-one winner: the K split halved / doubled, pipeline stages 2 and 4."""
    steps = triton.cdiv(in_features, best["BLOCK_K"])
    for split in {max(1, best["SPLIT_K"] // 2), best["SPLIT_K"], min(steps, best["SPLIT_K"] * 2)}:
        for stages in (2, 3, 4):
            yield {**best, "SPLIT_K": split, "num_stages": stages}


def timed_configs(configs, x, packed, state) -> list[tuple[float, dict]]:
    timed = []
    for config in configs:
        try:
            timed.append((time_us(matmul_4bit, x, packed, state, config=config), config))
        except Exception as error:  # a config out of shared memory / registers: skip it
            timed.append((float("inf"), {**config, "error": str(error)[:100]}))
    return sorted(timed, key=lambda t: t[0])


def worst_relative_error(x, packed, state) -> float:
    """max |kernel - bitsandbytes| / max |bitsandbytes| (bf16 rounding is ~4e-3 of each value)."""
    reference = reference_matmul(x, packed, state).float()
    return float((matmul_4bit(x, packed, state).float() - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[16])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for name, (n, k) in SHAPES_7B.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            entry = {"bytes": packed_bytes(n, k), "default_config": launch_config(rows, n, k, 64, x.device)}
            entry["worst_relative_error"] = worst_relative_error(x, packed, state)
            entry["kernel_us"] = time_us(matmul_4bit, x, packed, state)
            entry["dequant_matmul_us"] = time_us(reference_matmul, x, packed, state)
            entry["bf16_us"] = time_us(F.linear, x, weight)
            entry["kernel_fraction_of_bound"] = entry["bytes"] / (entry["kernel_us"] * 1e-6) / BANDWIDTH
            if args.sweep and rows == args.rows[0]:
                timed = timed_configs(sweep_configs(rows, n, k), x, packed, state)
                refined = timed_configs(refine_configs(timed[0][1], k), x, packed, state)
                timed = sorted(timed + refined, key=lambda t: t[0])
                entry["best"] = [{"us": us, **config} for us, config in timed[:8]]
                entry["all"] = [{"us": us, **config} for us, config in timed]
                entry["best_fraction_of_bound"] = entry["bytes"] / (timed[0][0] * 1e-6) / BANDWIDTH
                best = {key: v for key, v in timed[0][1].items() if key != "error"}
                reference = reference_matmul(x, packed, state).float()
                fused = matmul_4bit(x, packed, state, config=best).float()
                entry["best_worst_relative_error"] = float(
                    (fused - reference).abs().max() / reference.abs().max()
                )
            results["shapes"][f"{name}_m{rows}"] = entry
            print(
                name,
                rows,
                json.dumps({key: v for key, v in entry.items() if key not in ("best", "all")}),
                flush=True,
            )
            # Written after every shape, so a call that runs out of time keeps what it measured.
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=1)
            if "best" in entry:
                print("  best", entry["best"][:3], flush=True)
    # Prefill: the rollout's prompt (2 prompts x 606 tokens) through gate_proj, the kernel vs dequantise-once.
    n, k = SHAPES_7B["gate_up"]
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    x = torch.randn(1212, k, dtype=torch.bfloat16, device="cuda")
    results["prefill_1212_gate"] = {
        "kernel_us": time_us(matmul_4bit, x, packed, state),
        "dequant_matmul_us": time_us(reference_matmul, x, packed, state),
    }
    print("prefill", results["prefill_1212_gate"], flush=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
