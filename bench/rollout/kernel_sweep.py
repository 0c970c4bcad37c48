"""Time the fused 4-bit matmul on Qwen2-VL-7B's projection shapes against dequantise-then-matmul and bf16.

    python bench/rollout/kernel_sweep.py --out kernel_sweep.json --rows 16 8 32 64 [--sweep] [--budget-s 240] [--warm-l2]

Per shape and row count: microseconds per call (CUDA-graph replay, `triton.testing.do_bench_cudagraph`) of
the kernel at `launch_config`'s `DEFAULTS`, of bitsandbytes' dequantise + matmul and of cuBLAS on a bf16
copy, each also as a fraction of the H200's 4.8 TB/s over the packed bytes one call must read (codes +
uint8 absmax + second-level scales). `--sweep`, at the first `--rows`:

1. stage one: every kernel variant in `VARIANTS` (decoder, absmax mode, operand order, tiles, warps) on
   all four shapes at `launch_config`'s K split, each checked against bitsandbytes before it is timed (a
   variant that fails to compile or is wrong is recorded, not fatal);
2. stage two: around the variant with the least time per decoder layer (`PER_LAYER` calls of each shape),
   pipeline stages and programs per SM (the K split);
3. the `DEFAULTS` this recommends, printed as a dict to paste into vrft/kernels/nf4_matmul.py, timed at
   every `--rows` next to the current `DEFAULTS`.

L2: a decode step reads each weight once, so in the model every call finds its weights in HBM, not in L2.
Replaying one call over one matrix would keep a packed matrix that fits the L2 (gate/up: 34 MB of the
H200's 50 MB) resident between replays, while the bf16 copy (136 MB) does not fit: the kernel would look
faster than it is in the model, and faster next to cuBLAS than it is. So each timed replay calls every one
of several copies of the weights, as many as make up 3x the L2, and the time per call is that over the
number of copies (`--warm-l2`: one copy, as the sweeps before 2026-12-04 measured).

`--lora-rank R` also times, per shape, the kernel at `DEFAULTS` with the fused LoRA term of a rank-R
adapter (`lora_in` = x A^T in bf16, B in fp32, as the `packed` engine calls it) and that x A^T (cuBLAS):
what a projection costs in the model, next to the bare kernel; and q/k/v and gate/up each as one launch
over their weights (`matmul_4bit_segments`, as the `packed` engine groups them) with their adapters, against
their separate launches; and each group's x A^T by `lora_input` against cuBLAS.

Everything goes to `--out` (JSON, rewritten after each stage) and the log beside it (`.log`). Stages stop
early past `--budget-s` (compilations included), keeping what they measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import torch
import triton
from torch.nn import functional as F

from vrft.kernels.lora_input import lora_input
from vrft.kernels.nf4_matmul import (
    DEFAULTS,
    launch_config,
    matmul_4bit,
    matmul_4bit_segments,
    reference_matmul,
)
from vrft.kernels.nf4_segments import segments

BANDWIDTH = 4.8e12  # H200 datasheet, bytes/s
DEVICE = torch.device("cuda")
SHAPES_7B = {  # name: (out_features, in_features); per decoder layer, 28 layers; the largest first
    "gate_up": (18944, 3584),
    "down": (3584, 18944),
    "q_o": (3584, 3584),
    "k_v": (512, 3584),
}
PER_LAYER = {"gate_up": 2, "down": 1, "q_o": 2, "k_v": 2}
LAYERS = 28
WRONG = 0.02  # worst |kernel - bitsandbytes| / max |bitsandbytes| above this is a bug, not rounding (~0.003)
PRMT = {"DECODE": 2, "SCALE_AFTER": 1}
# Stage one, launch_config overrides; the most promising first, in case the budget runs out. Each variant
# aims at 512 / BLOCK_N programs per SM, which gives every tile width the same K split (split ~ programs x
# BLOCK_N / N): a wide tile at 8 programs per SM would split K 4x finer and write that many more fp32
# partial sums (at 16 rows, gate/up split 14 ways writes and reads ~34 MB of them, as much as its weights).
VARIANTS = [
    {**PRMT, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
    for n in (64, 128, 256)
    for k in (128, 256)
    for w in (4, 8)
] + [
    {**PRMT, "TRANSPOSED": 0, "BLOCK_N": 64, "BLOCK_K": 128},
    {**PRMT, "TRANSPOSED": 0, "BLOCK_N": 128, "BLOCK_K": 256},
    *({"SCALE_AFTER": 1, "BLOCK_N": n, "BLOCK_K": k} for n in (64, 128) for k in (128, 256)),
    {"BLOCK_N": 64, "BLOCK_K": 128},  # the first kernel's DEFAULTS
    {"BLOCK_N": 64, "BLOCK_K": 256},
    {"BLOCK_N": 128, "BLOCK_K": 128},
    {"TRANSPOSED": 0, "BLOCK_N": 64, "BLOCK_K": 256},
    {"DECODE": 1, "BLOCK_N": 64, "BLOCK_K": 128},
    {"DECODE": 1, "TRANSPOSED": 0, "BLOCK_N": 64, "BLOCK_K": 256},
    {"DECODE": 1, "SCALE_AFTER": 1, "BLOCK_N": 64, "BLOCK_K": 128},
    {"DECODE": 1, "SCALE_AFTER": 1, "BLOCK_N": 128, "BLOCK_K": 128},
]
VARIANTS = [{**choices, "programs_per_sm": 512 // choices["BLOCK_N"]} for choices in VARIANTS]
DEFAULT_KEYS = list(DEFAULTS)  # what a recommendation sets


class Log:
    """Prints a line and appends it to the log file beside the JSON."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, *parts) -> None:
        line = " ".join(str(part) for part in parts)
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def packed_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    blocks = out_features * in_features // blocksize
    return out_features * in_features // 2 + blocks + blocks // 256 * 4


def time_us(fn, calls: list[tuple], **kwargs) -> float:
    """Microseconds per `fn(*call, **kwargs)`, over every call of `calls` (one per weight copy) replayed in
    a CUDA graph: with copies that add up to more than the L2, each call reads its weights from HBM."""

    def every_call():
        for call in calls:
            fn(*call, **kwargs)

    return triton.testing.do_bench_cudagraph(every_call, rep=20) * 1e3 / len(calls)


def copies_for(nbytes: int, warm_l2: bool) -> int:
    """How many copies of an `nbytes` weight make up 3x the device's L2 (1 with `warm_l2`)."""
    if warm_l2:
        return 1
    l2_bytes = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    return min(256, max(2, math.ceil(3 * l2_bytes / nbytes)))


def fraction(name: str, us: float) -> float:
    """Packed bytes of shape `name` over `us` microseconds, as a fraction of the 4.8 TB/s bound."""
    return packed_bytes(*SHAPES_7B[name]) / (us * 1e-6) / BANDWIDTH


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference.float()).abs().max() / reference.float().abs().max())


def measure(case: dict, config: dict, kernel=matmul_4bit) -> dict:
    """One config of `kernel` (`matmul_4bit`, or another with its arguments) on one shape: checked against
    bitsandbytes, then timed; errors recorded, not raised."""
    try:
        packed, state = case["copies"][0]
        error = relative_error(kernel(case["x"], packed, state, config=config), case["reference"])
        if error > WRONG:
            return {"us": float("inf"), "error": error, "failure": "wrong result"}
        calls = [(case["x"], packed, state) for packed, state in case["copies"]]
        return {"us": time_us(kernel, calls, config=config), "error": error}
    except Exception as failure:  # out of shared memory / registers, a compile error: skip this config
        return {"us": float("inf"), "failure": f"{type(failure).__name__}: {str(failure)[:300]}"}


def microseconds(result: dict | float) -> float:
    """A timed result's microseconds: a `measure` dict's "us", or a bare figure."""
    return result["us"] if isinstance(result, dict) else result


def layer_us(per_shape: dict) -> float:
    """Microseconds of one decoder layer's seven projections (inf if a shape failed)."""
    return sum(PER_LAYER[name] * microseconds(per_shape[name]) for name in PER_LAYER)


def packed_copies(out_features: int, in_features: int, warm_l2: bool) -> tuple[torch.Tensor, list[tuple]]:
    """A random bf16 weight and its NF4 quantisation (double-quantised absmax, blocksize 64) as many times
    as `copies_for` asks: the same codes and scales at other addresses (quantising is deterministic)."""
    dense = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=DEVICE) * 0.02
    copies = [
        bnb_functional.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
        for _ in range(copies_for(packed_bytes(out_features, in_features), warm_l2))
    ]
    return dense, copies


def make_cases(rows: int, weights: dict) -> dict:
    cases = {}
    for name, (_, k) in SHAPES_7B.items():
        x = torch.randn(rows, k, dtype=torch.bfloat16, device=DEVICE)
        copies = weights[name]["copies"]
        cases[name] = {"x": x, "copies": copies, "reference": reference_matmul(x, *copies[0])}
    return cases


def sweep_variants(variants, rows: int, cases: dict, deadline: float, log: Log) -> list[dict]:
    """Each variant (launch_config choices) on every shape; stops starting new ones past `deadline`."""
    timed = []
    for choices in variants:
        if time.monotonic() > deadline:
            log("  budget reached: skipped", len(variants) - len(timed), "of", len(variants), "variants")
            break
        per_shape = {}
        for name, case in cases.items():
            config = launch_config(rows, *SHAPES_7B[name], 64, DEVICE, **choices)
            per_shape[name] = {"config": config, **measure(case, config)}
        entry = {"choices": choices, "per_shape": per_shape, "layer_us": layer_us(per_shape)}
        timed.append(entry)
        cells = " ".join(f"{name} {result['us']:7.1f}" for name, result in per_shape.items())
        failures = {name: r["failure"] for name, r in per_shape.items() if "failure" in r}
        log(f"  layer {entry['layer_us']:7.1f} us | {cells} | {json.dumps(choices)}", failures or "")
    return timed


def recommended_defaults(choices: dict) -> dict:
    return {key: choices.get(key, DEFAULTS[key]) for key in DEFAULT_KEYS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[16])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting sweep stages past this")
    parser.add_argument("--lora-rank", type=int, default=0, help="also time the fused LoRA term")
    parser.add_argument(
        "--warm-l2", action="store_true", help="time one weight copy (L2-resident if it fits)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    log = Log(out.with_suffix(".log"))
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "l2_bytes": torch.cuda.get_device_properties(DEVICE).L2_cache_size,
        "warm_l2": args.warm_l2,
        "current_defaults": dict(DEFAULTS),
        "rows": {},
    }

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(results, indent=1, default=str))

    torch.manual_seed(0)
    weights = {}
    for name, (n, k) in SHAPES_7B.items():
        dense, copies = packed_copies(n, k, args.warm_l2)
        dense_copies = [dense] + [dense.clone() for _ in range(copies_for(2 * n * k, args.warm_l2) - 1)]
        weights[name] = {"dense": dense_copies, "copies": copies}
        log(f"{name}: {len(copies)} packed copies, {len(dense_copies)} bf16 copies")
    recommended = None
    if args.sweep:
        rows = args.rows[0]
        cases = make_cases(rows, weights)
        log(f"stage one: {len(VARIANTS)} variants x {len(cases)} shapes at {rows} rows")
        stage_one = sweep_variants(VARIANTS, rows, cases, started + 0.55 * args.budget_s, log)
        results["stage_one"] = stage_one
        save()
        best = min(stage_one, key=lambda entry: entry["layer_us"])
        if best["layer_us"] == float("inf"):
            raise SystemExit("no variant ran on every shape: see the failures above")
        programs = best["choices"]["programs_per_sm"]
        refinements = [
            {**best["choices"], "num_stages": stages, "programs_per_sm": max(1, int(programs * factor))}
            for stages in (2, 3, 4)
            for factor in (0.25, 0.5, 1, 2)
            if (stages, factor) != (best["choices"].get("num_stages", DEFAULTS["num_stages"]), 1)
        ]
        refinements = list({json.dumps(choices, sort_keys=True): choices for choices in refinements}.values())
        log(f"stage two: {len(refinements)} pipeline depths / K splits around {json.dumps(best['choices'])}")
        stage_two = sweep_variants(refinements, rows, cases, started + 0.8 * args.budget_s, log)
        results["stage_two"] = stage_two
        winner = min([best, *stage_two], key=lambda entry: entry["layer_us"])
        recommended = recommended_defaults(winner["choices"])
        results["recommended_defaults"] = recommended
        every = stage_one + stage_two
        results["per_shape_best"] = {
            name: min((entry["per_shape"][name] for entry in every), key=lambda result: result["us"])
            for name in SHAPES_7B
        }
        save()
    for rows in args.rows:
        cases = make_cases(rows, weights)
        table = {}
        for name, case in cases.items():
            n, k = SHAPES_7B[name]
            x = case["x"]
            defaults = launch_config(rows, n, k, 64, x.device)
            entry = {"bytes": packed_bytes(n, k), "defaults": {"config": defaults, **measure(case, defaults)}}
            if recommended is not None:
                config = launch_config(rows, n, k, 64, x.device, **recommended)
                entry["recommended"] = {"config": config, **measure(case, config)}
            if args.lora_rank:
                lora_a = torch.randn(args.lora_rank, k, dtype=torch.bfloat16, device=DEVICE) * 0.02
                lora_b = torch.randn(n, args.lora_rank, device=DEVICE) * 0.02
                lora_in = F.linear(x, lora_a)
                entry["defaults_lora"] = time_us(
                    matmul_4bit,
                    [(x, *copy, None, lora_in, lora_b, 2.0) for copy in case["copies"]],
                    config=defaults,
                )
                entry["lora_a_us"] = time_us(F.linear, [(x, lora_a)])
            entry["dequant_matmul_us"] = time_us(reference_matmul, [(x, *copy) for copy in case["copies"]])
            entry["bf16_us"] = time_us(F.linear, [(x, dense) for dense in weights[name]["dense"]])
            table[name] = entry
        if args.lora_rank:
            grouped = results.setdefault("grouped", {})[rows] = grouped_us(cases, args.lora_rank)
            log(f"{rows} rows, one launch per input group, rank {args.lora_rank}:", json.dumps(grouped))
            down = results.setdefault("lora_input", {})[rows] = lora_input_us(rows, args.lora_rank)
            log(f"{rows} rows, x A^T per input group (us): lora_input against cuBLAS:", json.dumps(down))
        results["rows"][rows] = table
        save()
        report_rows(rows, table, results.get("per_shape_best") if rows == args.rows[0] else None, log)
    if recommended is not None:
        log(
            "recommended DEFAULTS (vrft/kernels/nf4_matmul.py), least time per decoder layer at",
            args.rows[0],
            "rows:",
        )
        log("DEFAULTS = " + json.dumps(recommended, indent=4))
    # Prefill: 2 prompts x 606 tokens through gate_proj; the engine keeps dequantise-once there (results.md).
    x = torch.randn(1212, SHAPES_7B["gate_up"][1], dtype=torch.bfloat16, device=DEVICE)
    calls = [(x, *copy) for copy in weights["gate_up"]["copies"]]
    results["prefill_1212_gate"] = {
        "kernel_us": time_us(matmul_4bit, calls),
        "dequant_matmul_us": time_us(reference_matmul, calls),
    }
    log("prefill 1212 rows, gate:", json.dumps(results["prefill_1212_gate"]))
    save()
    log(f"done in {time.monotonic() - started:.0f} s")


def grouped_us(cases: dict, rank: int) -> dict:
    """us per decoder layer of q/k/v and of gate/up, each as one launch with a rank-`rank` adapter per weight
    (x A^T of the group computed outside, as the engine does), and as separate launches."""
    result = {}
    for label, names in (("q_k_v", ("q_o", "k_v", "k_v")), ("gate_up", ("gate_up", "gate_up"))):
        x = cases[names[0]]["x"]
        count = len(cases[names[0]]["copies"])
        lora_in = torch.randn(x.shape[0], rank * len(names), dtype=torch.bfloat16, device=DEVICE)
        groups, alone = [], []
        for copy in range(count):
            members = []  # a different copy for each member where the shape repeats (k and v)
            for position, name in enumerate(names):
                copies = cases[name]["copies"]
                packed, state = copies[(copy + position) % len(copies)]
                lora_b = torch.randn(state.shape[0], rank, device=DEVICE) * 0.02
                members.append((packed, state, None, lora_b, position * rank))
                alone.append(
                    (x, packed, state, None, lora_in[:, position * rank : (position + 1) * rank], lora_b, 2.0)
                )
            groups.append((x, segments(members), lora_in, 2.0))
        one = time_us(matmul_4bit_segments, groups)
        result[label] = {"one_launch_us": one, "separate_us": time_us(matmul_4bit, alone) * len(names)}
    return result


def lora_input_us(rows: int, rank: int) -> dict:
    """us per `x A^T` of each input group of a 7B layer (q/k/v, gate/up, o, down: 3, 2, 1, 1 adapters of
    rank `rank`): `lora_input`'s one launch against cuBLAS (`F.linear`, a split-K GEMM and its reduce)."""
    result = {}
    for label, (adapters, in_features) in {"q_k_v": (3, 3584), "gate_up": (2, 3584), "o": (1, 3584),
                                            "down": (1, 18944)}.items():  # fmt: skip
        x = torch.randn(rows, in_features, dtype=torch.bfloat16, device=DEVICE)
        a = torch.randn(adapters * rank, in_features, dtype=torch.bfloat16, device=DEVICE) * 0.02
        steps = triton.cdiv(in_features, 128)
        result[label] = {
            "lora_input_us": time_us(lora_input, [(x, a)]),
            "cublas_us": time_us(F.linear, [(x, a)]),
            "lora_input_us_by_split": {
                split: time_us(lora_input, [(x, a)], split_k=split)
                for split in sorted({1, 2, 4, 7, 8, 14, 16, 32, steps // 4, steps // 2})
                if 1 <= split <= min(steps, 74)
            },
        }
    return result


def report_rows(rows: int, table: dict, per_shape_best: dict | None, log: Log) -> None:
    """Per shape: us and % of the bound for each contender; per layer and per 28-layer decode step."""
    log(f"\n{rows} rows: us per call (% of the 4.8 TB/s bound on the packed bytes)")
    columns = ["defaults", "defaults_lora", "lora_a_us", "recommended", "dequant_matmul_us", "bf16_us"]
    for name, entry in table.items():
        cells = []
        if per_shape_best is not None:
            best = per_shape_best[name]
            cells.append(
                f"swept best {best['us']:.1f} ({100 * fraction(name, best['us']):.0f}%) {json.dumps(best['config'])}"
            )
        for column in columns:
            if column in entry:
                us = microseconds(entry[column])
                cells.append(f"{column.removesuffix('_us')} {us:.1f} ({100 * fraction(name, us):.0f}%)")
        log(f"  {name:8s}", " | ".join(cells))
    for column in ("defaults", "defaults_lora", "lora_a_us", "recommended"):
        if all(column in entry for entry in table.values()):
            layer = layer_us({name: entry[column] for name, entry in table.items()})
            log(
                f"  {column}: {layer:.1f} us per layer, {LAYERS * layer / 1e3:.2f} ms of projections per decode step"
            )


if __name__ == "__main__":
    main()
