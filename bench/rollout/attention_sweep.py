"""Decode attention at Qwen2-VL-7B's shape: `vrft.kernels.decode_attention` by split against SDPA (GPU).

    python bench/rollout/attention_sweep.py --out attention.json [--rows 16] [--columns 640,700]

Per (sequences, cache columns, step column): us per call of the decoder's torch attention (`DecodeOps`: SDPA
with its additive mask, whichever backend torch picks: cuDNN on the H200) and of the kernel at each split
(and by columns per loop step, warps and split), each timed by `kernel_sweep.time_us` (Triton's CUDA-graph
timer) over 3 layers' caches, one call per layer as a decode step makes them. The figures in
results/tuning_call/ were taken by this script at commit a5a2dd9, which timed with its own CUDA-graph loop.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

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
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=768, help="cache columns (prompt + new tokens)")
    parser.add_argument("--columns", default="640,700,767", help="the step's column, comma-separated")
    parser.add_argument("--splits", default="1,2,4,8,12,16")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.rows, KV_HEADS, args.capacity, HEAD_DIM)
    caches = [
        (
            torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
            torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
        )
        for _ in range(LAYERS)
    ]
    q = torch.randn(args.rows, KV_HEADS, GROUPS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    valid = torch.ones(args.rows, args.capacity, dtype=torch.bool, device="cuda")
    scale = HEAD_DIM**-0.5
    keys, values = [k for k, _ in caches], [v for _, v in caches]
    results = []
    for column in (int(c) for c in args.columns.split(",")):
        at = torch.tensor([column], device="cuda")
        valid[:, column + 1 :] = False
        attend = DecodeOps().attention(valid, keys, values, at, scale)
        row = {"rows": args.rows, "capacity": args.capacity, "column": column}
        row["sdpa_us"] = time_us(attend, [(q, layer) for layer in range(LAYERS)])
        calls = [(q, *cache) for cache in caches]
        kernel = dict(valid=valid, column=at, scale=scale)
        for splits in [*(int(s) for s in args.splits.split(",")), None]:
            row[f"kernel_split{splits or '_default'}_us"] = time_us(
                decode_attention, calls, **kernel, splits=splits
            )
        for block_l, warps, splits in itertools.product((32, 64, 128), (2, 4, 8), (4, 8)):
            row[f"kernel_block{block_l}_warps{warps}_split{splits}_us"] = time_us(
                decode_attention, calls, **kernel, splits=splits, block_l=block_l, num_warps=warps
            )
        results.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    args.out.write_text(
        json.dumps({"command": "python bench/rollout/attention_sweep.py", "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
