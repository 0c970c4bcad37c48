"""`x A^T` in one launch (vrft.kernels.lora_input) against fp32 sums rounded once."""

import importlib.util

import pytest
import torch

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.interpreter import interpreted


def assert_rounded_once(y, x, a, label=""):
    """`y` is `x a^T` summed in fp32 (any order) and rounded once to `x.dtype`: within u |exact| (u the unit
    roundoff) plus the fp32 reordering error, K 2^-24 of sum |x_k a_k| (2^-12 of it covers K to 4096; the
    7B down projection's K = 18944 gets 2^-10)."""
    exact = x.double() @ a.double().T
    magnitude = x.double().abs() @ a.double().abs().T
    unit = torch.finfo(x.dtype).eps / 2
    reorder = 2**-12 if x.shape[1] <= 4096 else 2**-10
    excess = (y.double() - exact).abs() - (unit * exact.abs() + reorder * magnitude)
    assert excess.max() <= 0, f"{label} worst excess over the bound {excess.max():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 33, 64])
@pytest.mark.parametrize("ranks, in_features", [(192, 3584), (64, 18944), (40, 300), (8, 256)])
def test_lora_input_is_x_a_transposed_rounded_once_and_replays_in_a_graph(rows, ranks, in_features):
    from vrft.kernels.lora_input import lora_input

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
    a = (torch.randn(ranks, in_features, device="cuda") * 0.02).to(torch.bfloat16)
    eager = eager_equal_to_replays(lambda: lora_input(x, a))
    assert_rounded_once(eager, x, a, f"{rows} x {in_features} x {ranks}")


INTERPRETED = """
import sys, torch
from vrft.kernels.lora_input import lora_input
torch.manual_seed(0)
cases = []
for rows, ranks, k, split in [(5, 192, 512, None), (16, 64, 640, 3), (33, 40, 300, 2), (1, 8, 256, 1)]:
    x = torch.randn(rows, k, dtype=torch.float16)
    a = (torch.randn(ranks, k) * 0.05).to(torch.float16)
    cases.append((x, a, lora_input(x, a, split)))
torch.save(cases, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_lora_input_logic_under_the_triton_interpreter(tmp_path):
    # Masks off every edge (rows, ranks, K = 300 off the 128-wide step) and split-K reductions of 1 to 4.
    for x, a, y in interpreted(INTERPRETED, tmp_path / "cases.pt"):
        assert_rounded_once(y, x, a, f"{tuple(x.shape)} {tuple(a.shape)}")


def test_lora_input_refuses_what_it_does_not_handle():
    from vrft.kernels.lora_input import lora_input

    with pytest.raises(ValueError, match="lora_input takes x"):
        lora_input(torch.zeros(65, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
