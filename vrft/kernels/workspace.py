"""What the split-K kernels share: the multiprocessor count they size their split by, and the fp32
workspace and arrival counters through which the last K slice of a tile adds the others' partial sums
(`nf4_matmul`, `nf4_mma`, `lora_input`, `decode_attention`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_COUNTERS: dict[torch.device, Tensor] = {}  # per device: split-K arrival counters, always left at zero


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, what the kernels size their split by (4 on the CPU interpreter)."""
    if device.type != "cuda":  # the Triton interpreter on CPU tensors (tests)
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_workspace(
    x: Tensor, grid: tuple[int, int, int], block_m: int, block_n: int, through_workspace: bool = False
) -> tuple[Tensor, Tensor]:
    """What a split-K launch over `grid` (tiles along N, tiles along M, K slices) reduces through, for
    `nf4_epilogue.store_output`: `(partial, counters)`, an fp32 workspace of every slice's `[block_m,
    block_n]` sums (one placeholder element without a split, unless `through_workspace`: the sums of
    unsplit tiles pass through it too) and at least one arrival counter per tile, at zero (each launch
    leaves them so; shared by every launch on the device)."""
    tiles, split_k = grid[0] * grid[1], grid[2]
    whole = split_k > 1 or through_workspace
    partial = x.new_empty(tiles * split_k * block_m * block_n if whole else 1, dtype=torch.float32)
    counters = _COUNTERS.get(x.device)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=x.device)
        _COUNTERS[x.device] = counters
    return partial, counters


def launch_outputs(
    x: Tensor,
    width: int,
    grid: tuple[int, int, int],
    block_m: int,
    block_n: int,
    through_workspace: bool = False,
):
    """What a 4-bit matmul launch over `grid` writes: `(y [rows, width] in x's dtype, partial, counters)`,
    the last two from `split_workspace`."""
    y = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    return (y, *split_workspace(x, grid, block_m, block_n, through_workspace))
