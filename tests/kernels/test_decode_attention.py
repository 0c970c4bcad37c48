"""Decode attention split along the cache (vrft.kernels.decode_attention) against softmax attention in fp64."""

import importlib.util

import pytest
import torch

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.interpreter import interpreted

# (sequences, KV heads, query heads per KV head, head dim, cache columns, the step's column, splits)
CASES = [
    (16, 4, 7, 128, 730, 700, None),  # Qwen2-VL-7B at 16 sequences, the default split
    (3, 1, 6, 16, 37, 20, None),
    (3, 1, 6, 16, 37, 20, 1),  # one slice: no merge
    (2, 2, 2, 64, 100, 99, 3),  # the last column; slices of 64 columns, the third empty
]


def case(count, kv_heads, groups, head_dim, capacity, column, dtype, device):
    """Queries, caches and the valid mask of one step. Rows are left-padded by different amounts, and
    columns after `column` hold huge keys and values and are marked valid: only the column bound keeps
    them out, as the cache's unwritten columns must be kept out."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(count, kv_heads, groups, head_dim, generator=generator)
    keys = torch.randn(count, kv_heads, capacity, head_dim, generator=generator)
    values = torch.randn(count, kv_heads, capacity, head_dim, generator=generator)
    keys[:, :, column + 1 :] = 1e4
    values[:, :, column + 1 :] = 1e4
    valid = torch.ones(count, capacity, dtype=torch.bool)
    for row in range(count):
        valid[row, : 3 * row] = False
    return [t.to(device) for t in (q.to(dtype), keys.to(dtype), values.to(dtype), valid)] + [
        torch.tensor([column], device=device)
    ]


def assert_close_to_exact(out, q, keys, values, valid, column, scale):
    """Within eps(dtype) max|v| of fp64 attention: each probability is rounded to the cache's dtype before
    the product with the values (relative u = eps / 2: the weighted mean moves by at most u max|v|), and the
    output is rounded once (u |out| <= u max|v|); fp32 scores, exp and sums add ~1e-6 relative."""
    usable = valid.clone()
    usable[:, int(column) + 1 :] = False
    scores = torch.einsum("nhgd,nhld->nhgl", q.double(), keys.double()) * scale
    scores = scores.masked_fill(~usable[:, None, None, :], float("-inf"))
    exact = torch.einsum("nhgl,nhld->nhgd", scores.softmax(-1), values.double())
    largest = values[:, :, : int(column) + 1].double().abs().max()
    bound = (torch.finfo(out.dtype).eps + 2**-16) * largest
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - exact).abs().max() <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count, kv_heads, groups, head_dim, capacity, column, splits", CASES)
def test_decode_attention_is_softmax_attention_and_replays_in_a_graph(
    count, kv_heads, groups, head_dim, capacity, column, splits, dtype
):
    from vrft.kernels.decode_attention import decode_attention

    q, keys, values, valid, at = case(count, kv_heads, groups, head_dim, capacity, column, dtype, "cuda")
    scale = head_dim**-0.5
    out = eager_equal_to_replays(lambda: decode_attention(q, keys, values, valid, at, scale, splits))
    assert_close_to_exact(out, q, keys, values, valid, at, scale)


INTERPRETED = """
import sys, torch
from tests.kernels.test_decode_attention import CASES, case
from vrft.kernels.decode_attention import decode_attention
results = []
for count, kv_heads, groups, head_dim, capacity, column, splits in CASES[1:]:
    for dtype in (torch.float16, torch.float32):  # the interpreter has no bf16 arithmetic (numpy has none)
        inputs = case(count, kv_heads, groups, head_dim, capacity, column, dtype, "cpu")
        out = decode_attention(*inputs, head_dim**-0.5, splits)
        results.append((out, inputs, head_dim**-0.5))
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_decode_attention_under_the_triton_interpreter(tmp_path):
    for out, inputs, scale in interpreted(INTERPRETED, tmp_path / "attention.pt"):
        assert_close_to_exact(out, *inputs, scale)
