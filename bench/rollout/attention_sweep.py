"""Decode attention at Qwen2-VL-7B's shape: `vrft.kernels.decode_attention` by split against SDPA (GPU).

    python bench/rollout/attention_sweep.py --out attention.json [--rows 16] [--columns 640,700]

Per (sequences, cache columns, step column): us per call of SDPA with the additive mask the decoder's torch
ops give it (whichever backend torch picks: cuDNN on the H200) and of the kernel at each split (and by
columns per loop step, warps and split), each timed
as 200 replays of a CUDA graph of 20 calls over 3 layers' caches (a decode step reads each layer's once).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from vrft.kernels.decode_attention import decode_attention

KV_HEADS, GROUPS, HEAD_DIM = 4, 7, 128
LAYERS, CALLS, REPLAYS = 3, 20, 200


def timed(call) -> float:
    """us per call: a CUDA graph of CALLS calls, replayed REPLAYS times after a warm-up."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS)


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
    layers = itertools.cycle(caches)  # each call reads the next layer's cache, as a decode step does
    results = []
    for column in (int(c) for c in args.columns.split(",")):
        at = torch.tensor([column], device="cuda")
        valid[:, column + 1 :] = False
        mask = torch.zeros(valid.shape, dtype=torch.bfloat16, device="cuda")
        mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
        sdpa = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, scale=scale)
        row = {"rows": args.rows, "capacity": args.capacity, "column": column}
        row["sdpa_us"] = timed(lambda: sdpa(q, *next(layers)))  # noqa: B023 (called before the next column)
        for splits in [*(int(s) for s in args.splits.split(",")), None]:
            kernel = functools.partial(decode_attention, valid=valid, column=at, scale=scale, splits=splits)
            row[f"kernel_split{splits or '_default'}_us"] = timed(lambda: kernel(q, *next(layers)))  # noqa: B023
        for block_l, warps, splits in itertools.product((32, 64, 128), (2, 4, 8), (4, 8)):
            kernel = functools.partial(
                decode_attention, valid=valid, column=at, scale=scale, splits=splits, block_l=block_l,
                num_warps=warps,
            )  # fmt: skip
            name = f"kernel_block{block_l}_warps{warps}_split{splits}_us"
            row[name] = timed(lambda: kernel(q, *next(layers)))  # noqa: B023
        results.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    args.out.write_text(
        json.dumps({"command": "python bench/rollout/attention_sweep.py", "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
