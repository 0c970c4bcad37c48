"""The decode step's fused element-wise kernels (vrft.kernels.decode_fusions) against the torch ops they
replace (vrft.rollout.stages.DecodeOps)."""

import importlib.util

import pytest
import torch

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.interpreter import interpreted
from vrft.rollout.stages import DecodeOps, FusedDecodeOps

# Qwen2-VL-7B's decode shapes at 16 rows, and a small odd one (masked columns, one KV head)
SHAPES = [
    dict(rows=16, hidden=3584, heads=28, kv_heads=4, head_dim=128, inter=18944, cache=40),
    dict(rows=3, hidden=96, heads=6, kv_heads=1, head_dim=16, inter=200, cache=7),
]


def case(rows, hidden, heads, kv_heads, head_dim, inter, cache, dtype, device):
    """Inputs of one decode step's element-wise stages; q/k/v and gate/up as column views of one output,
    as the packed engine's grouped launches give them."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    qkv = randn(rows, 1, (heads + 2 * kv_heads) * head_dim)
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    angles = torch.rand(rows, 1, head_dim // 2, generator=generator) * 6.3
    angles = torch.cat((angles, angles), -1)
    gate_up = randn(rows, 1, 2 * inter, scale=3.0)
    return dict(
        hidden=randn(rows, 1, hidden),
        delta=randn(rows, 1, hidden, scale=0.5),
        weight=randn(hidden, scale=0.2),
        q=qkv[..., :q_end],
        k=qkv[..., q_end:k_end],
        v=qkv[..., k_end:],
        cos=angles.cos().to(dtype).to(device),
        sin=angles.sin().to(dtype).to(device),
        keys=randn(rows, kv_heads, cache, head_dim),
        values=randn(rows, kv_heads, cache, head_dim),
        column=torch.tensor([cache - 2], device=device),
        gate=gate_up[..., :inter],
        up=gate_up[..., inter:],
    )


def stages(ops, c, eps=1e-6):
    """Every stage once through `ops`: outputs and the caches they wrote (on copies of `c`'s caches)."""
    keys, values = c["keys"].clone(), c["values"].clone()
    summed, normed = ops.add_rms_norm(c["hidden"], c["delta"], c["weight"], eps)
    first, first_normed = ops.add_rms_norm(c["hidden"], None, c["weight"], eps)
    q = ops.rope_into_cache(c["q"], c["k"], c["v"], c["cos"], c["sin"], keys, values, c["column"])
    return dict(
        summed=summed, normed=normed, first=first, first_normed=first_normed, q=q, keys=keys, values=values,
        silu_mul=ops.silu_mul(c["gate"], c["up"]),
    )  # fmt: skip


def assert_within_one_rounding(fused, reference, label):
    """The fused RMSNorm sums its squares in another order than torch (and SiLU's `1 + exp(-x)` may be
    contracted differently): the fp32 value can differ in its last bits, so the value rounded to 16 bits can
    land one step away, and a product rounded after it one more: at most 2^-6 relative (two steps of
    bf16's 2^-8..2^-7), and such ties are rare (an fp32 difference of ~1e-7 crosses a bf16 rounding boundary for ~1e-5 of the values; 1% allowed).
    In fp32 (the interpreter's cases) most values differ in their last bits, each by far less than 2^-6."""
    sixteen_bit = fused.element_size() == 2
    fused, reference = fused.float(), reference.float()
    differ = (fused != reference).float().mean()
    assert ((fused - reference).abs() <= reference.abs() * 2**-6).all(), label
    assert differ <= 0.01 or not sixteen_bit, f"{label}: {differ:.4f} of the values differ"


def compare(fused, reference):
    exact = ("summed", "first", "q", "keys", "values")  # additions, products and copies rounded as torch's
    for key in exact:
        torch.testing.assert_close(fused[key], reference[key], rtol=0, atol=0, msg=key)
    for key in ("normed", "first_normed", "silu_mul"):
        assert_within_one_rounding(fused[key], reference[key], key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["7b", "small"])
def test_fused_decode_stages_compute_the_torch_ops_and_replay_in_a_graph(shape, dtype):
    c = case(**shape, dtype=dtype, device="cuda")
    reference = stages(DecodeOps(), c)
    fused = stages(FusedDecodeOps(), c)
    compare(fused, reference)
    for key in ("q", "silu_mul"):
        assert fused[key].is_contiguous(), key
    eager_equal_to_replays(
        lambda: torch.cat([t.flatten().float() for t in stages(FusedDecodeOps(), c).values()])
    )


@pytest.mark.gpu
def test_fused_decode_ops_are_picked_on_cuda_and_fall_back_on_mixed_dtypes():
    c = case(**SHAPES[1], dtype=torch.bfloat16, device="cuda")
    hidden, normed = FusedDecodeOps().add_rms_norm(c["hidden"], c["delta"].float(), c["weight"], 1e-6)
    assert (
        hidden.dtype == torch.float32
    )  # torch promotes bf16 + fp32; the fused kernel does not, so torch ran
    torch.testing.assert_close(hidden, c["hidden"] + c["delta"].float(), rtol=0, atol=0)


INTERPRETED = """
import sys, torch
from tests.kernels.test_decode_fusions import SHAPES, case, stages
from vrft.rollout.stages import DecodeOps, FusedDecodeOps
results = []
for shape in SHAPES:
    for dtype in (torch.float16, torch.float32):  # the interpreter has no bf16 arithmetic (numpy has none)
        c = case(**shape, dtype=dtype, device="cpu")
        results.append((stages(FusedDecodeOps(), c), stages(DecodeOps(), c)))
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_decode_stages_under_the_triton_interpreter(tmp_path):
    for fused, reference in interpreted(INTERPRETED, tmp_path / "stages.pt"):
        compare(fused, reference)
