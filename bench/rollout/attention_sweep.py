"""Decode attention at Qwen2-VL-7B's shape: `vrft.kernels.decode_attention` by slices against torch's (GPU).

    python bench/rollout/attention_sweep.py --out attention.json [--prompts 2] [--group 8] [--columns 0,63,127]

Per (prompts x G sequences, prompt columns, the step's generated column): us per call of the decoder's torch
attention (`DecodeOps`, `torch_us`: each prompt's G rows as one batch over its cache, fp32; until the
twenty-sixth session SDPA over each row's prompt and generated columns put together, `sdpa_us`) and of the
kernel at each `(prompt slices, generated slices)` (and by columns per loop step and warps), each timed by
`kernel_sweep.time_us` (Triton's CUDA-graph timer) over 3 layers' caches, one call per layer as a decode step
makes them. The figures in results/tuning_call/ were taken by this script at commit a5a2dd9 (one cache per
sequence, the prompt's columns copied to each), which timed with its own CUDA-graph loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from kernel_sweep import time_us  # this folder's kernel benchmark (the script's folder is on sys.path)

from vrft.kernels.decode_attention import decode_attention
from vrft.rollout.stages import DecodeOps

KV_HEADS, GROUPS, HEAD_DIM = 4, 7, 128
LAYERS = 3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8, help="G: sequences per prompt")
    parser.add_argument("--prompt-columns", type=int, default=606, help="prompt tokens (512 image tokens)")
    parser.add_argument("--steps", type=int, default=128, help="generated columns a sequence has room for")
    parser.add_argument("--columns", default="0,63,127", help="the step's generated column, comma-separated")
    parser.add_argument("--slices", default="1:1,2:1,4:1,4:2,8:1,8:2,8:4,16:2")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a file holding the kernel before the prompt's cache was shared (`git show 404a651:vrft/kernels/"
        "decode_attention.py`): timed too, on one cache per sequence with the prompt copied into each",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    count = args.prompts * args.group

    def cache(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, KV_HEADS, columns, HEAD_DIM, dtype=torch.bfloat16, device="cuda")

    state = SimpleNamespace(
        keys=[cache(count, args.steps) for _ in range(LAYERS)],
        values=[cache(count, args.steps) for _ in range(LAYERS)],
        prompt_keys=[cache(args.prompts, args.prompt_columns) for _ in range(LAYERS)],
        prompt_values=[cache(args.prompts, args.prompt_columns) for _ in range(LAYERS)],
        prompt_valid=torch.ones(args.prompts, args.prompt_columns, dtype=torch.bool, device="cuda"),
        column=torch.zeros(1, dtype=torch.long, device="cuda"),
    )
    q = torch.randn(count, KV_HEADS, GROUPS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    scale = HEAD_DIM**-0.5
    calls = [
        (q, state.keys[layer], state.values[layer], state.column, scale, state.prompt_keys[layer],
         state.prompt_values[layer], state.prompt_valid)
        for layer in range(LAYERS)
    ]  # fmt: skip
    baseline = old_calls = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_attention", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        valid = torch.ones(count, args.prompt_columns + args.steps, dtype=torch.bool, device="cuda")
        at = torch.zeros(1, dtype=torch.long, device="cuda")
        old_calls = [
            (
                q,
                *(torch.cat((p.repeat_interleave(args.group, 0), g), dim=2) for p, g in pairs),
                valid,
                at,
                scale,
            )
            for pairs in (
                ((state.prompt_keys[i], state.keys[i]), (state.prompt_values[i], state.values[i]))
                for i in range(LAYERS)
            )
        ]
    results = []
    for column in (int(c) for c in args.columns.split(",")):
        state.column.fill_(column)
        attend = DecodeOps().attention(state, scale)
        row = {
            "sequences": count,
            "group": args.group,
            "prompt_columns": args.prompt_columns,
            "column": column,
        }
        row["torch_us"] = time_us(attend, [(q, layer) for layer in range(LAYERS)])
        if baseline is not None:  # its cache columns: the prompt's, then the generated ones up to `column`
            at.fill_(args.prompt_columns + column)
            row["baseline_us"] = time_us(baseline.decode_attention, old_calls)
        chosen = [tuple(int(n) for n in pair.split(":")) for pair in args.slices.split(",")]
        for slices in [*chosen, None]:
            name = f"{slices[0]}_{slices[1]}" if slices else "_default"
            row[f"kernel_slices{name}_us"] = time_us(decode_attention, calls, slices=slices)
        for block_l, warps in itertools.product((32, 64, 128), (4, 8)):
            row[f"kernel_block{block_l}_warps{warps}_us"] = time_us(
                decode_attention, calls, block_l=block_l, num_warps=warps
            )
        results.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    args.out.write_text(
        json.dumps({"command": "python bench/rollout/attention_sweep.py", "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
