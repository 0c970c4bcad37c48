"""The decoder's torch attention (`vrft.rollout.stages.DecodeOps.attention`) on this machine's CPU against
another commit's (`--baseline`: a copy of that commit's `vrft/rollout/stages.py`), one layer of one decode step.

    git show e860e9d:vrft/rollout/stages.py > /tmp/stages_sdpa.py
    python bench/rollout/torch_attention_cpu.py --baseline /tmp/stages_sdpa.py --out attention_cpu.json

Shapes: 2 prompts x G = 8 sequences at Qwen2-VL-7B's (4 KV heads of 7 query heads, head dim 128, a 606-token
prompt, 128 generated columns, the step at column 100) in fp32 and bf16, and at the `tiny` preset's (2 KV
heads of 2, head dim 16, a 60-token prompt, 24 columns, the step at column 20) in fp32. Per shape the two
versions take turns, `--rounds` times, each round timing `--calls` calls; ms per call is the median round.
On the GPU `bench/rollout/attention_sweep.py` times the same function (`torch_us`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vrft.rollout.stages import DecodeOps

SHAPES = {  # name: (prompts, G, KV heads, query heads per KV head, head dim, prompt columns, steps, column, dtype)
    "7b_fp32": (2, 8, 4, 7, 128, 606, 128, 100, torch.float32),
    "7b_bf16": (2, 8, 4, 7, 128, 606, 128, 100, torch.bfloat16),
    "tiny_fp32": (2, 8, 2, 2, 16, 60, 24, 20, torch.float32),
}


def inputs(prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, dtype):
    """A query and a decode state of one layer, the second prompt left-padded by 5 tokens."""
    generator = torch.Generator().manual_seed(0)
    count = prompts * group

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    valid = torch.ones(prompts, prompt_columns, dtype=torch.bool)
    valid[1:, :5] = False
    state = SimpleNamespace(
        keys=[randn(count, kv_heads, steps, head_dim)],
        values=[randn(count, kv_heads, steps, head_dim)],
        prompt_keys=[randn(prompts, kv_heads, prompt_columns, head_dim)],
        prompt_values=[randn(prompts, kv_heads, prompt_columns, head_dim)],
        prompt_valid=valid,
        column=torch.tensor([column]),
    )
    return randn(count, kv_heads, groups, head_dim), state, head_dim**-0.5


def round_ms(attend, q, calls: int) -> float:
    # A plain loop, not torch.utils.benchmark.Timer: tried, its rounds came out 0.06-2 ms a call slower
    # (the tiny shape's 0.07 ms became 0.20), which buries the differences measured here.
    start = time.perf_counter()
    for _ in range(calls):
        attend(q, 0)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--baseline", type=Path, required=True, help="another commit's vrft/rollout/stages.py"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("baseline_stages", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    versions = {"this_tree": DecodeOps(), "baseline": baseline.DecodeOps()}
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "baseline": str(args.baseline)}
    for name, shape in SHAPES.items():
        q, state, scale = inputs(*shape)
        attends = {version: ops.attention(state, scale) for version, ops in versions.items()}
        gap = (attends["this_tree"](q, 0).float() - attends["baseline"](q, 0).float()).abs().max().item()
        rounds = {version: [] for version in versions}
        for _ in range(args.rounds):
            for version, attend in attends.items():
                rounds[version].append(round_ms(attend, q, args.calls))
        results[name] = {
            **{f"{version}_ms": statistics.median(times) for version, times in rounds.items()},
            **{f"{version}_rounds_ms": times for version, times in rounds.items()},
            "max_abs_difference": gap,
        }
        print(f"{name}: this tree {results[name]['this_tree_ms']:.2f} ms, baseline "
              f"{results[name]['baseline_ms']:.2f} ms (outputs differ by at most {gap:.2e})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
