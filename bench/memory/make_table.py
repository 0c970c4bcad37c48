"""Turn benchmark records into `bench/memory/results/*.json` and the tables of `bench/README.md`.

    python bench/memory/make_table.py [ROWS.jsonl ...]

With files, their records (from `run_matrix.py`) are written to `results/<row>.json` first; then every
record in `results/` is tabulated. The planner's prediction is recomputed with the current calibration
(`plan now`) next to the one the run recorded (`plan at run`), so the table shows how well the committed
planner matches each measured peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import open_dict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rows import compose_row  # noqa: E402

from vrft.planner.planning import plan_config, resolve_auto  # noqa: E402

RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- memory-tables:start -->", "<!-- memory-tables:end -->"
TARGETS = {  # row -> peak reserved target (GiB), from issue 5
    "qwen2vl-7b_int4_G8_16g": 16,
    "qwen2vl-7b_int4_G16": 22,
    "qwen25vl-7b_int4_G8_16g": 16,
    "qwen2vl-2b_int4_G8": 8,
    "qwen2vl-2b_int8_G8": 12,
    "qwen2vl-2b_mixed_G8": 12,
}


def plan_now(record: dict):
    cfg = resolve_auto(compose_row(record["overrides"], "/tmp/unused", "/tmp/unused"), quiet=True)
    config = record["config"]
    with open_dict(cfg):
        cfg.plan.prompt_text_tokens = config["prompt_tokens"] - config["image_tokens"]
        cfg.plan.image_tokens = config["image_tokens"]
    return plan_config(cfg)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows_table(records: list[dict]) -> list[str]:
    lines = [
        "| row | model | precision | rollout engine | G | new tokens | image tokens | peak allocated GiB | "
        "peak reserved GiB (phase) | plan now GiB (error) | plan at run GiB | target | s / step | rollout tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        c, m = r["config"], r["measured"]
        plan = plan_now(r)
        error = 100 * (plan.peak_reserved_gb / m["peak_reserved_gb"] - 1) if m["peak_reserved_gb"] else None
        target = TARGETS.get(r["name"])
        verdict = (
            "-"
            if target is None
            else f"<= {target}: {'met' if m['peak_reserved_gb'] <= target else 'MISSED'}"
        )
        timing = "" if r.get("concurrent_rows", 1) == 1 else " *"
        lines.append(
            f"| {r['name']} | {c['model']} | {c['precision']} | {c['rollout_engine']} | {c['group_size']} | "
            f"{c['max_new_tokens']} | {c['image_tokens']} | {fmt(m['peak_allocated_gb'])} | "
            f"{fmt(m['peak_reserved_gb'])} ({m['peak_phase']}) | {plan.peak_reserved_gb:.2f} ({error:+.1f}%) | "
            f"{fmt(r['plan']['peak_reserved_gb'])} | {verdict} | {fmt(m['seconds_per_step'], 1)}{timing} | "
            f"{fmt(m['rollout_tokens_per_s'], 0)}{timing} |"
        )
    return lines


def speed_table(records: list[dict]) -> list[str]:
    lines = [
        "| model (weights) | rollout engine | ms / decode step | decode tok/s | x plain generate | "
        "weight GB read / step | % of 4.8 TB/s (weights) | % (weights + KV) | CUDA graph | "
        "log-prob vs training forward: mean / max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for engine, s in (r.get("speed") or {}).items():
            if "step_ms" not in s:
                lines.append(f"| {r['config']['model']} | {engine} | {s.get('error')} | | | | | | | |")
                continue
            agree = (r.get("agreement") or {}).get(engine)
            agreement = (
                "-"
                if not agree
                else f"{agree['mean_abs_logprob_diff']:.3f} / {agree['max_abs_logprob_diff']:.3f}"
            )
            graph = "yes" if s["engine_stats"].get("cuda_graph") else "no"
            lines.append(
                f"| {r['config']['model']} ({r['config']['precision']}) | {engine} | {s['step_ms']:.1f} | "
                f"{s['tokens_per_s']:.0f} | {s['speedup_vs_hf']:.1f} | {s['weight_bytes_per_step'] / 1e9:.2f} | "
                f"{100 * s['weight_bandwidth_fraction']:.1f} | {100 * s['weight_and_kv_bandwidth_fraction']:.1f} | "
                f"{graph} | {agreement} |"
            )
    return lines


SWEEPS = {  # sweep -> (setting label, [(value, row name)])
    "group size G": [(4, "sweep_G4"), (8, "qwen2vl-2b_int4_G8"), (16, "sweep_G16")],
    "completion tokens": [(128, "sweep_len128"), (256, "qwen2vl-2b_int4_G8"), (512, "sweep_len512")],
    "image tokens": [(128, "sweep_img128"), (242, "sweep_img256"), (512, "qwen2vl-2b_int4_G8")],
}
COMPONENTS = ("kv_cache", "prefill", "activations", "logprob_buffers", "vision_tower", "stored_rollouts")


def first_step_peak(record: dict) -> float:
    """Peak reserved GiB of the first optimizer step (the sweep rows run one step, the base row two)."""
    return max(phase["reserved_gb"] for phase in record["steps"][0]["phases"].values())


def sweep_table(by_name: dict[str, dict]) -> list[str]:
    lines = [
        "| sweep (qwen2vl-2b int4, bf16_copy) | points | measured peak reserved GiB (step 1) | "
        "measured slope MiB / unit | " + " | ".join(f"plan: {c} MiB / unit" for c in COMPONENTS) + " |",
        "|---|---|---|---|" + "---|" * len(COMPONENTS),
    ]
    for label, points in SWEEPS.items():
        found = [(v, by_name[n]) for v, n in points if n in by_name]
        if len(found) < 2:
            continue
        (v0, r0), (v1, r1) = found[0], found[-1]
        measured = (first_step_peak(r1) - first_step_peak(r0)) * 1024 / (v1 - v0)
        p0, p1 = plan_now(r0).components, plan_now(r1).components
        slopes = [(p1[c] - p0[c]) / 2**20 / (v1 - v0) for c in COMPONENTS]
        values = ", ".join(f"{v}: {first_step_peak(r):.2f}" for v, r in found)
        lines.append(
            f"| {label} | {', '.join(str(v) for v, _ in found)} | {values} | {measured:.1f} | "
            + " | ".join(f"{s:.1f}" for s in slopes)
            + " |"
        )
    return lines


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    for source in sys.argv[1:]:
        for line in Path(source).read_text().splitlines():
            record = json.loads(line)
            record.pop("traceback", None) if "error" not in record else None
            (RESULTS / f"{record['name']}.json").write_text(json.dumps(record, indent=2) + "\n")
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    ok = [r for r in records if r.get("measured", {}).get("peak_reserved_gb")]
    order = {name: i for i, name in enumerate(TARGETS)}
    ok.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    by_name = {r["name"]: r for r in ok}
    env = ok[0]["env"] if ok else {}
    text = [
        START,
        f"Measured on {env.get('gpu')} (torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"bitsandbytes {env.get('bitsandbytes')}); generated by `bench/memory/make_table.py`.",
        "",
        "### Peak memory per row",
        "",
        *rows_table(ok),
        "",
        "`*`: the row shared the GPU with other rows (memory is per process and exact; times overlap).",
        "",
        "### Rollout decode speed (same trained policy, same run, 2 prompts x G = 16 sequences, 128 new tokens)",
        "",
        *speed_table(ok),
        "",
        "### Scaling (memory slope per unit of the swept setting)",
        "",
        *sweep_table(by_name),
        END,
    ]
    readme = README.read_text()
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(head + "\n".join(text) + tail)
    print("\n".join(text))


if __name__ == "__main__":
    main()
