"""What the GPU tests of the split-K kernels check under CUDA-graph replay (the rollout engines replay them)."""

from __future__ import annotations

import torch


def eager_equal_to_replays(call):
    """`call()` run eagerly, then captured in a CUDA graph and replayed three times: each replay must write
    the eager result bit for bit (a split-K launch's arrival counters must be back at zero after every
    replay). Returns the eager result."""
    eager = call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for _ in range(3):
        graph.replay()
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    return eager
