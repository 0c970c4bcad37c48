"""The `packed` rollout engine against `hf`, `dequant` and `bf16_copy` on Qwen2-VL-7B int4, one device call.

    python bench/rollout/packed.py --out $OUT [--timeout 400]

Runs `bench/memory/run_row.py` for the 16 GB profile of `qwen2vl-7b int4 G=8` (random-weight preset, 24 GiB
cap, one optimizer step with `rollout_engine=auto`), then times the decode step of every engine on the
trained policy (`bench/memory/speed.py`: 2 prompts x G = 16 sequences, 128 new tokens) and compares their
log-probs with the training forward. Writes `<out>/row.json` (run_row's record), `<out>/packed.json` (the
summary below) and prints the markdown table of bench/rollout/results.md.

Bandwidth bound: the weight bytes one decode step must read in the engine's storage format (packed 4-bit
codes + scales of the decoder layers, the bf16 `lm_head` and norms; for `bf16_copy` its bf16 copy) over the
H200's 4.8 TB/s datasheet bandwidth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEMORY = ROOT / "bench" / "memory"
ENGINES = "hf,dequant,bf16_copy,packed"
OVERRIDES = [
    "+hw=rtx4080-16g",
    "memory_cap_gb=24",
    "model=qwen2vl-7b",
    "precision=int4",
    "trainer.max_steps=1",
]


def summary(record: dict, engines_run: str = ENGINES) -> dict:
    """Per engine: ms per decode step, tokens/s, % of the bandwidth bound, x plain generate, log-prob gap."""
    engines = {}
    for name, speed in (record.get("speed") or {}).items():
        agreement = (record.get("agreement") or {}).get(name, {})
        engines[name] = {
            "step_ms": speed.get("step_ms"),
            "tokens_per_s": speed.get("tokens_per_s"),
            "weight_gb_per_step": speed.get("weight_bytes_per_step", 0) / 1e9,
            "percent_of_bound": 100 * speed.get("weight_bandwidth_fraction", 0),
            "x_generate": speed.get("speedup_vs_hf"),
            "cuda_graph": (speed.get("engine_stats") or {}).get("cuda_graph"),
            "logprob_mean_abs_diff": agreement.get("mean_abs_logprob_diff"),
            "logprob_max_abs_diff": agreement.get("max_abs_logprob_diff"),
            "error": speed.get("error"),
        }
    steps = record.get("steps") or [{}]
    return {
        "command": f"python bench/rollout/packed.py --out $OUT --engines {engines_run}  # = run_row.py "
        f"--speed {engines_run} -- " + " ".join(OVERRIDES),
        "env": record.get("env"),
        "auto_engine": (record.get("config") or {}).get("rollout_engine"),
        "train_step_seconds": steps[-1].get("seconds"),
        "peak_reserved_gb": (record.get("measured") or {}).get("peak_reserved_gb"),
        "engines": engines,
        "error": record.get("error"),
    }


def table(result: dict) -> str:
    lines = [
        "| engine | ms / decode step | decode tok/s | % of 4.8 TB/s on its weight bytes | weight GB / step "
        "| x plain generate | CUDA graph | log-prob vs training: mean / max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["engines"].items():
        if e.get("error"):
            lines.append(f"| {name} | {e['error'][:80]} | | | | | | |")
            continue
        gap = (
            "-"
            if e["logprob_mean_abs_diff"] is None
            else f"{e['logprob_mean_abs_diff']:.3f} / {e['logprob_max_abs_diff']:.3f}"
        )
        lines.append(
            f"| {name} | {e['step_ms']:.1f} | {e['tokens_per_s']:.0f} | {e['percent_of_bound']:.1f} "
            f"| {e['weight_gb_per_step']:.2f} | {'-' if e['x_generate'] is None else format(e['x_generate'], '.1f')} | {'yes' if e['cuda_graph'] else 'no'} | {gap} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--engines", default=ENGINES, help=f"comma-separated (default {ENGINES})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = Path("/tmp/vrft-bench/images")
    if not images.exists():
        subprocess.run([sys.executable, str(MEMORY / "make_images.py"), str(images)], check=True)
    row = args.out / "row.json"
    command = [sys.executable, str(MEMORY / "run_row.py"), "--name", "qwen2vl-7b_int4_G8_16g_packed"]
    command += ["--images", str(images), "--out", str(row), "--speed", args.engines, "--", *OVERRIDES]
    subprocess.run(command, timeout=args.timeout, check=False)
    result = summary(json.loads(row.read_text()), args.engines)
    (args.out / "packed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "engines"}))
    print(table(result))


if __name__ == "__main__":
    main()
