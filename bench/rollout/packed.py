"""The `packed` rollout engine against `hf`, `dequant` and `bf16_copy` on Qwen2-VL-7B int4, one device call.

    python bench/rollout/packed.py --out $OUT [--rows 16g,24g,16g_G16] [--engines ...] [--timeout 300]

Runs `bench/memory/run_row.py` (random-weight `qwen2vl-7b`, `precision=int4`, 24 GiB cap, two optimizer
steps with `rollout_engine=auto`; the second step is the steady state) for each row, one after the other so
their times do not overlap:

- `16g`: the 16 GB profile (`+hw=rtx4080-16g`) at G = 8; `auto` takes `packed` there. After training it
  times the decode step of every engine on the trained policy (`bench/memory/speed.py`: 2 prompts x G = 16
  sequences, 128 new tokens) and compares their log-probs with the training forward.
- `24g`: the 24 GB profile (`+hw=rtx4090`) at G = 8 with `bf16_copy`, which `auto` took there before it put
  `packed` first. The baseline of the 16 GB profile's step time (issue 17: within 1.1x).
- `16g_G16`: the 16 GB profile at G = 16 (issue 17: peak reserved within 16 GiB).

Writes `<out>/row_<row>.json` (run_row's record), `<out>/packed.json` (the summary) and prints the markdown
tables of bench/rollout/results.md.

Bandwidth bound: the weight bytes one decode step must read in the engine's storage format (packed 4-bit
codes + scales of the decoder layers, the bf16 `lm_head` and norms; for `bf16_copy` its bf16 copy) over the
datasheet bandwidth of the card the run had (`bench/memory/speed.py`'s `BANDWIDTHS`: 4.8 TB/s on an H200).
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
COMMON = ["memory_cap_gb=24", "model=qwen2vl-7b", "precision=int4", "trainer.max_steps=2"]
ROWS = {  # row -> (hardware profile and settings, whether the engines' decode speed is timed after it)
    "16g": (["+hw=rtx4080-16g", *COMMON], True),
    "24g": (["+hw=rtx4090", *COMMON, "algorithm.rollout_engine=bf16_copy"], False),
    "16g_G16": (["+hw=rtx4080-16g", *COMMON, "algorithm.group_size=16"], False),
}
PROFILED = "packed,bf16_copy"  # engines whose decode step is also profiled by kernel (eager, no CUDA graph)
G16_TARGET_GIB = 16.0
STEP_RATIO_TARGET = 1.1
H200_BANDWIDTH = 4.8e12  # the bound of the speed records written before they named their card's


def engine_summary(record: dict) -> dict:
    """Per engine: ms per decode step, tokens/s, % of the bandwidth bound, x plain generate, log-prob gap."""
    engines = {}
    for name, speed in (record.get("speed") or {}).items():
        agreement = (record.get("agreement") or {}).get(name, {})
        engines[name] = {
            "step_ms": speed.get("step_ms"),
            "tokens_per_s": speed.get("tokens_per_s"),
            "weight_gb_per_step": speed.get("weight_bytes_per_step", 0) / 1e9,
            "percent_of_bound": 100 * speed.get("weight_bandwidth_fraction", 0),
            "device": speed.get("device"),
            "bandwidth": speed.get("bandwidth", H200_BANDWIDTH),
            "x_generate": speed.get("speedup_vs_hf"),
            "cuda_graph": (speed.get("engine_stats") or {}).get("cuda_graph"),
            "logprob_mean_abs_diff": agreement.get("mean_abs_logprob_diff"),
            "logprob_max_abs_diff": agreement.get("max_abs_logprob_diff"),
            "error": speed.get("error"),
        }
    return engines


def row_summary(record: dict) -> dict:
    """One row's steady-state step (the last optimizer step), its phases and peak memory."""
    steps = record.get("steps") or []
    last = steps[-1] if steps else {}
    metrics = last.get("metrics", {})
    measured = record.get("measured") or {}
    return {
        "command": record.get("command"),
        "rollout_engine": (record.get("config") or {}).get("rollout_engine"),
        "group_size": (record.get("config") or {}).get("group_size"),
        "steps": len(steps),
        "step_seconds": [s.get("seconds") for s in steps],
        "rollout_s": metrics.get("time/rollout_s"),
        "reference_s": metrics.get("time/reference_s"),
        "update_s": metrics.get("time/update_s"),
        "peak_reserved_gb": measured.get("peak_reserved_gb"),
        "peak_phase": measured.get("peak_phase"),
        "planned_gb": (record.get("plan") or {}).get("peak_reserved_gb"),
        "error": record.get("error"),
    }


def summary(records: dict[str, dict], engines_run: str) -> dict:
    """The engines' decode figures (from the `16g` row) and every row's step, with the issue's two checks."""
    rows = {name: row_summary(record) for name, record in records.items()}
    result = {
        "command": f"python bench/rollout/packed.py --out $OUT --rows {','.join(records)} --engines {engines_run}",
        "env": next((r.get("env") for r in records.values() if r.get("env")), None),
        "engines": engine_summary(records.get("16g", {})),
        "decode_profile": records.get("16g", {}).get("profile"),
        "rows": rows,
    }
    small, large = rows.get("16g", {}), rows.get("24g", {})
    if small.get("step_seconds") and large.get("step_seconds"):
        result["step_ratio_16g_over_24g"] = small["step_seconds"][-1] / large["step_seconds"][-1]
    if rows.get("16g_G16", {}).get("peak_reserved_gb") is not None:
        result["g16_peak_reserved_gb"] = rows["16g_G16"]["peak_reserved_gb"]
    return result


def engine_table(result: dict) -> str:
    bandwidth = next((e["bandwidth"] for e in result["engines"].values()), H200_BANDWIDTH)  # one card a run
    lines = [
        f"| engine | ms / decode step | decode tok/s | % of {bandwidth / 1e12:.2f} TB/s on its weight bytes "
        "| weight GB / step "
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
        speedup = "-" if e["x_generate"] is None else format(e["x_generate"], ".1f")
        lines.append(
            f"| {name} | {e['step_ms']:.1f} | {e['tokens_per_s']:.0f} | {e['percent_of_bound']:.1f} "
            f"| {e['weight_gb_per_step']:.2f} | {speedup} | {'yes' if e['cuda_graph'] else 'no'} | {gap} |"
        )
    return "\n".join(lines)


def profile_table(result: dict, top: int = 10) -> str:
    """Per profiled engine: GPU time per decode step, by kernel (the largest `top`)."""
    lines = []
    for name, profile in (result.get("decode_profile") or {}).items():
        if profile.get("error"):
            lines.append(f"{name}: {profile['error']}")
            continue
        lines += [
            f"{name}: {profile['gpu_us_per_step'] / 1e3:.2f} ms of kernels per decode step, "
            f"{profile['launches_per_step']:.0f} launches",
            "| kernel | us / step | launches / step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{k['kernel']}` | {k['us_per_step']:.0f} | {k['calls_per_step']:.0f} |"
            for k in profile["top"][:top]
        ]
        lines.append("")
    return "\n".join(lines)


def row_table(result: dict) -> str:
    lines = [
        "| row | rollout engine | G | s / step (steps 1, 2) | rollout / reference / update s (step 2) "
        "| peak reserved GiB (phase) | planned GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        if r.get("error") and not r["step_seconds"]:
            lines.append(f"| {name} | {r['error'][:80]} | | | | | |")
            continue
        seconds = ", ".join(f"{s:.1f}" for s in r["step_seconds"])
        phases = " / ".join(
            "-" if r[k] is None else f"{r[k]:.1f}" for k in ("rollout_s", "reference_s", "update_s")
        )
        peak = "-" if r["peak_reserved_gb"] is None else f"{r['peak_reserved_gb']:.2f} ({r['peak_phase']})"
        planned = "-" if r["planned_gb"] is None else f"{r['planned_gb']:.2f}"
        lines.append(
            f"| {name} | {r['rollout_engine']} | {r['group_size']} | {seconds} | {phases} | {peak} | {planned} |"
        )
    checks = []
    if "step_ratio_16g_over_24g" in result:
        ratio = result["step_ratio_16g_over_24g"]
        verdict = "met" if ratio <= STEP_RATIO_TARGET else "not met"
        checks.append(
            f"16 GB / 24 GB profile, steady-state step: {ratio:.2f}x (target <= {STEP_RATIO_TARGET}: {verdict})"
        )
    if "g16_peak_reserved_gb" in result:
        peak = result["g16_peak_reserved_gb"]
        verdict = "met" if peak <= G16_TARGET_GIB else "not met"
        checks.append(
            f"G = 16 on the 16 GB profile: {peak:.2f} GiB peak reserved (target <= {G16_TARGET_GIB:.0f}: {verdict})"
        )
    return "\n".join(lines + [""] + [f"- {c}" for c in checks])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated (default {','.join(ROWS)})")
    parser.add_argument("--engines", default=ENGINES, help=f"comma-separated (default {ENGINES})")
    parser.add_argument(
        "--profiled", default=PROFILED, help=f"engines profiled by kernel (default {PROFILED})"
    )
    parser.add_argument(
        "--row-args", default="", help="more arguments of run_row.py, e.g. '--phase-stats --trace-rollout'"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = Path("/tmp/vrft-bench/images")
    if not images.exists():
        subprocess.run([sys.executable, str(MEMORY / "make_images.py"), str(images)], check=True)
    records = {}
    for name in args.rows.split(","):
        overrides, timed = ROWS[name]
        path = args.out / f"row_{name}.json"
        command = [sys.executable, str(MEMORY / "run_row.py"), "--name", f"qwen2vl-7b_int4_{name}"]
        command += ["--images", str(images), "--out", str(path)]
        command += ["--speed", args.engines, "--profile", args.profiled] if timed else []
        command += args.row_args.split()
        try:
            subprocess.run([*command, "--", *overrides], timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"row {name}: timed out after {args.timeout} s", flush=True)
        records[name] = json.loads(path.read_text()) if path.exists() else {"error": "no record"}
        result = summary(records, args.engines)  # written after every row: a later timeout loses nothing
        (args.out / "packed.json").write_text(json.dumps(result, indent=2))
    print(engine_table(result))
    print()
    print(profile_table(result))
    print(row_table(result))


if __name__ == "__main__":
    main()
