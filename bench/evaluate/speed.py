"""Evaluation speed: rows/s of `vrft.evaluate`'s greedy decoding, fast rollout engine against plain `generate`.

Runs the real evaluation (`vrft.evaluate.evaluate`) on synthetic detection rows for each model and engine,
every completion forced to `--tokens` tokens (`min_new_tokens = max_new_tokens`), so that both engines
decode the same number of steps whatever the random weights say. Rows/s is measured after the first batch
(weight preparation, CUDA graph capture and kernel warm-up are in it). Also reports the fraction of rows
whose greedy completion is identical under both engines.

    python bench/evaluate/speed.py --out bench/evaluate/results/h200.json
    python bench/evaluate/speed.py --models tiny --precision fp32 --rows 4 --batch-size 2 --tokens 8 \
        --out /tmp/speed.json   # a CPU check that the script works

Writes the JSON given by `--out` and a markdown table next to it (same name, `.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vrft.evaluate import evaluate

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def run_one(model: str, engine: str, args: argparse.Namespace, folder: Path) -> dict:
    """Evaluate `model` (base, random weights) with `engine`; returns its speed and completions."""
    overrides = [
        f"model={model}",
        f"precision={args.precision}",
        "task=detection",
        "data=synthetic",
        f"data.synthetic.num_test={args.rows}",
        "data.synthetic.num_train=8",  # only the test split is decoded
        f"data.synthetic.image_size={args.image_size}",
        "split=test",
        f"max_new_tokens={args.tokens}",
        f"min_new_tokens={args.tokens}",
        f"batch_size={args.batch_size}",
        f"rollout_engine={engine}",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    cfg.run_dir = str(folder / f"{model}-{engine}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    evaluate(cfg)
    summary = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    lines = (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        **summary["speed"]["base"],
        "peak_gb": peak,
        "completions": [json.loads(x)["completion"] for x in lines],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | precision | engine | rows/s (after batch 1) | rows/s (all) | speed-up | same completions "
        "| common prefix (median chars of) | peak GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        steady = "-" if r["steady_rows_per_s"] is None else f"{r['steady_rows_per_s']:.2f}"
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['engine']} | {steady} | {r['rows_per_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['same_completions']:.0%} | "
            f"{r['common_prefix_chars']:.0f} of {r['completion_chars']:.0f} | {peak} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write (a .md table goes next to it)")
    parser.add_argument("--models", default="qwen2vl-2b,qwen2vl-7b", help="comma-separated model presets")
    parser.add_argument(
        "--engines", default="hf,bf16_copy", help="comma-separated; the first is the baseline"
    )
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--rows", type=int, default=64, help="rows decoded per model and engine")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="every completion is forced to this length")
    parser.add_argument(
        "--image-size", type=int, default=448, help="square synthetic images (448: 256 visual tokens)"
    )
    parser.add_argument(
        "--baseline",
        help="the first engine's per-run JSON (`OUT.MODEL-ENGINE.json`) from an earlier call with the same "
        "settings and one model: it is not run again (7B: one call cannot load the random weights twice)",
    )
    args = parser.parse_args()
    if args.baseline and "," in args.models:
        parser.error("--baseline holds one model's run; give one model in --models")
    engines = args.engines.split(",")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models.split(","):
            runs = {}
            if args.baseline:  # the first engine's run, measured by an earlier call with the same settings
                runs[engines[0]] = json.loads(Path(args.baseline).read_text())
            for engine in engines:
                if engine in runs:
                    continue
                started = time.perf_counter()
                runs[engine] = run_one(model, engine, args, Path(scratch))
                seconds = time.perf_counter() - started
                print(f"{model} {engine}: {seconds:.0f} s (load + decode)", flush=True)
                # Kept as each run finishes, so a call that runs out of time still returns what it measured.
                partial = Path(args.out).with_suffix(f".{model}-{engine}.json")
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({**runs[engine], "seconds": seconds}, indent=2))
            baseline = runs[engines[0]]
            for engine, run in runs.items():
                pairs = list(zip(run["completions"], baseline["completions"], strict=True))
                same = sum(a == b for a, b in pairs)
                # Where greedy decoding first parts ways, in characters: random weights give near-flat logits,
                # so a bf16 rounding difference flips an argmax early; this says how early.
                prefix = [len(os.path.commonprefix([a, b])) for a, b in pairs]
                rate, base_rate = (
                    run["steady_rows_per_s"] or run["rows_per_s"],
                    baseline["steady_rows_per_s"] or baseline["rows_per_s"],
                )
                results.append(
                    {
                        "model": model,
                        "precision": args.precision,
                        "engine": engine,
                        "rows_per_s": run["rows_per_s"],
                        "steady_rows_per_s": run["steady_rows_per_s"],
                        "speedup": rate / base_rate,
                        "same_completions": same / len(baseline["completions"]),
                        "common_prefix_chars": statistics.median(prefix),
                        "completion_chars": statistics.median(len(a) for a, _ in pairs),
                        "first_completions": run["completions"][:2],
                        "peak_gb": run["peak_gb"],
                    }
                )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    markdown = table(results)
    out.with_suffix(".md").write_text(f"Settings: {json.dumps(settings)}\n\n{markdown}\n")
    print(markdown)


if __name__ == "__main__":
    main()
