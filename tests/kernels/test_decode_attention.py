"""Decode attention split along the cache (vrft.kernels.decode_attention) against softmax attention in fp64."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.interpreter import interpreted

# (prompts, G, KV heads, query heads per KV head, head dim, prompt columns, generated columns, the step's
# generated column, (prompt slices, generated slices))
CASES = [
    (2, 8, 4, 7, 128, 606, 128, 100, None),  # Qwen2-VL-7B at 16 sequences, the default split
    (2, 16, 4, 7, 128, 606, 256, 200, None),  # G = 16: a prompt's sequences in two tiles (9 + 7)
    (2, 3, 1, 6, 16, 37, 20, 12, None),
    (1, 3, 1, 6, 16, 37, 20, 12, (1, 1)),  # one slice of each kind
    (
        3,
        1,
        2,
        2,
        64,
        100,
        70,
        69,
        (3, 2),
    ),  # G = 1; the last column; 64-column slices, the prompt's third short
    (1, 12, 1, 6, 16, 20, 8, 0, None),  # 10 sequences a tile: the second tile holds 2; the first column
]


def case(prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, dtype, device):
    """Queries, caches and the prompts' valid mask of one step. Prompts are left-padded by different amounts,
    and generated columns after `column` hold huge keys and values: only the column bound keeps them out, as
    the cache's unwritten columns must be kept out."""
    generator = torch.Generator().manual_seed(0)
    count = prompts * group
    q = torch.randn(count, kv_heads, groups, head_dim, generator=generator)
    keys = torch.randn(count, kv_heads, steps, head_dim, generator=generator)
    values = torch.randn(count, kv_heads, steps, head_dim, generator=generator)
    keys[:, :, column + 1 :] = 1e4
    values[:, :, column + 1 :] = 1e4
    prompt_keys = torch.randn(prompts, kv_heads, prompt_columns, head_dim, generator=generator)
    prompt_values = torch.randn(prompts, kv_heads, prompt_columns, head_dim, generator=generator)
    prompt_valid = torch.ones(prompts, prompt_columns, dtype=torch.bool)
    for prompt in range(prompts):
        prompt_valid[prompt, : 3 * prompt] = False
    tensors = [q.to(dtype), keys.to(dtype), values.to(dtype), torch.tensor([column])]
    tensors += [prompt_keys.to(dtype), prompt_values.to(dtype), prompt_valid]
    return [t.to(device) for t in tensors]


def assert_close_to_exact(out, q, keys, values, column, prompt_keys, prompt_values, prompt_valid, scale):
    """Within eps(dtype) max|v| of fp64 attention over each row's prompt and generated columns: each
    probability is rounded to the cache's dtype before the product with the values (relative u = eps / 2:
    the weighted mean moves by at most u max|v|), and the output is rounded once (u |out| <= u max|v|);
    fp32 scores, exp and sums add ~1e-6 relative."""
    group = q.shape[0] // prompt_keys.shape[0]
    end = int(column) + 1
    every_key = torch.cat((prompt_keys.repeat_interleave(group, 0), keys[:, :, :end]), dim=2).double()
    every_value = torch.cat((prompt_values.repeat_interleave(group, 0), values[:, :, :end]), dim=2).double()
    usable = torch.cat(
        (prompt_valid.repeat_interleave(group, 0), torch.ones(q.shape[0], end, dtype=torch.bool)), dim=1
    )
    scores = torch.einsum("nhgd,nhld->nhgl", q.double(), every_key) * scale
    scores = scores.masked_fill(~usable[:, None, None, :], float("-inf"))
    exact = torch.einsum("nhgl,nhld->nhgd", scores.softmax(-1), every_value)
    largest = every_value.abs().max()
    bound = (torch.finfo(out.dtype).eps + 2**-16) * largest
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - exact).abs().max() <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, slices", CASES
)
def test_decode_attention_is_softmax_attention_and_replays_in_a_graph(
    prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, slices, dtype
):
    from vrft.kernels.decode_attention import decode_attention

    inputs = case(prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, dtype, "cuda")
    q, keys, values, at, prompt_keys, prompt_values, prompt_valid = inputs
    scale = head_dim**-0.5
    out = eager_equal_to_replays(
        lambda: decode_attention(q, keys, values, at, scale, prompt_keys, prompt_values, prompt_valid, slices)
    )
    assert_close_to_exact(out.cpu(), *[t.cpu() for t in inputs], scale)  # the fp64 reference on the CPU


class LargestTensor(TorchDispatchMode):
    """The most elements any op's output has while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, slices", CASES
)
def test_the_torch_decode_attention_reads_each_prompts_cache_once(
    prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, slices, dtype
):
    """`DecodeOps.attention` (the CPU's, and the fused ops' fallback) is within the fused kernel's bound of
    fp64 attention, and makes no tensor as large as every row's whole cache: the copy of each prompt's keys
    and values for each of its G rows, put together with the row's own, that the attention once made."""
    from vrft.rollout.stages import DecodeOps

    inputs = case(prompts, group, kv_heads, groups, head_dim, prompt_columns, steps, column, dtype, "cpu")
    q, keys, values, at, prompt_keys, prompt_values, prompt_valid = inputs
    state = SimpleNamespace(
        keys=[keys], values=[values], prompt_keys=[prompt_keys], prompt_values=[prompt_values],
        prompt_valid=prompt_valid, column=at,
    )  # fmt: skip
    attend = DecodeOps().attention(state, head_dim**-0.5)
    with LargestTensor() as largest:
        out = attend(q, 0)
    assert_close_to_exact(out, *inputs, head_dim**-0.5)
    assert largest.numel < keys.shape[0] * kv_heads * (prompt_columns + steps) * head_dim


INTERPRETED = """
import sys, torch
from tests.kernels.test_decode_attention import CASES, case
from vrft.kernels.decode_attention import decode_attention
results = []
for *shape, slices in CASES[2:]:
    head_dim = shape[4]
    for dtype in (torch.float16, torch.float32):  # the interpreter has no bf16 arithmetic (numpy has none)
        inputs = case(*shape, dtype, "cpu")
        q, keys, values, at, prompt_keys, prompt_values, prompt_valid = inputs
        out = decode_attention(q, keys, values, at, head_dim**-0.5, prompt_keys, prompt_values, prompt_valid,
                               slices)
        results.append((out, inputs, head_dim**-0.5))
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_decode_attention_under_the_triton_interpreter(tmp_path):
    for out, inputs, scale in interpreted(INTERPRETED, tmp_path / "attention.pt"):
        assert_close_to_exact(out, *inputs, scale)
