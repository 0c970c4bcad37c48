"""The fused 4-bit matmul kernel against bitsandbytes' dequantise-then-matmul, and its refusals."""

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from vrft.kernels import nf4_matmul
from vrft.kernels.nf4_matmul import environment_unsupported, layout_unsupported, reference_matmul, supports

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def quantised(out_features, in_features, quant_type="nf4", double_quant=True, blocksize=64, device="cuda"):
    """A random bf16 weight `[N, K]` quantised as `Linear4bit` stores it: `(packed, quant_state)`."""
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device) * 0.05
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def assert_within_bf16_rounding(y, x, packed, state, reference):
    # Both sides multiply the same bf16 inputs by the same bf16 weights (code * absmax in fp32, rounded once)
    # and accumulate in fp32; they differ in the order of that accumulation and in the one final rounding to
    # bf16. So: one bf16 ulp of the output (2^-7 relative), plus the fp32 reordering error, at most
    # K * 2^-24 of the sum of |x_k w_k| (2^-12 of it covers K up to 4096 with a margin).
    weight = bnb_functional.dequantize_4bit(packed, state).float()
    magnitude = x.float().abs() @ weight.abs().T
    bound = 2**-7 * reference.float().abs() + 2**-12 * magnitude
    excess = (y.float() - reference.float()).abs() - bound
    assert excess.max() <= 0, f"worst excess over the bound {excess.max():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [1, 8, 16, 33, 64])
@pytest.mark.parametrize(
    "out_features, in_features, blocksize",
    [(200, 320, 64), (512, 1024, 64), (96, 3584, 64), (1000, 768, 128), (72, 1024, 256)],
)
def test_kernel_equals_bitsandbytes_dequantise_then_matmul(
    quant_type, double_quant, rows, out_features, in_features, blocksize
):
    # N = 200, 1000, 72 are not multiples of the 64-wide output tile; K = 320 gives a 5-block row (prime
    # split); K = 3584 is Qwen2-VL-7B's hidden size (a split K).
    torch.manual_seed(0)
    packed, state = quantised(out_features, in_features, quant_type, double_quant, blocksize)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(out_features, dtype=torch.bfloat16, device="cuda")
    y = nf4_matmul.matmul_4bit(x, packed, state, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    assert_within_bf16_rounding(y, x, packed, state, reference_matmul(x, packed, state, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 2, 8])
def test_fused_lora_term_and_split_k_reduction_under_graph_replay(split_k):
    torch.manual_seed(0)
    packed, state = quantised(384, 1024)
    x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    lora_a = torch.randn(8, 1024, device="cuda") * 0.05  # fp32 adapter, as the precision plugin keeps it
    lora_b = torch.randn(384, 8, device="cuda") * 0.05
    config = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3}

    def call():
        return nf4_matmul.matmul_4bit(
            x, packed, state, None, x.float() @ lora_a.T, lora_b, 2.0, config=config
        )

    eager = call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for _ in range(3):  # the split-K arrival counters must be back at zero after every replay
        graph.replay()
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    lora = 2.0 * (x.float() @ lora_a.T) @ lora_b.T
    reference = (reference_matmul(x, packed, state).float() + lora).to(torch.bfloat16)
    assert_within_bf16_rounding(eager, x, packed, state, reference)


def test_layout_reasons_name_what_is_not_handled():
    assert layout_unsupported("nf4", 64, torch.bfloat16, 3584) is None
    assert "quant_type 'int2'" in layout_unsupported("int2", 64, torch.bfloat16, 3584)
    assert "blocksize 32" in layout_unsupported("nf4", 32, torch.bfloat16, 3584)
    assert "float32" in layout_unsupported("fp4", 128, torch.float32, 3584)
    assert "in_features 100" in layout_unsupported("nf4", 64, torch.bfloat16, 100)


def test_supports_explains_a_cpu_weight_and_a_plain_tensor():
    packed, state = quantised(64, 128, device="cpu")
    weight = types.SimpleNamespace(quant_state=state, dtype=packed.dtype, device=packed.device)
    reason = supports(weight)
    assert reason == environment_unsupported("cpu")
    assert "Triton is not installed" in reason or "needs a CUDA device" in reason
    assert "no quant_state" in supports(torch.zeros(4))
    state.blocksize = 32
    assert "blocksize 32" in supports(weight)


def test_reference_matmul_is_dequantise_then_linear():
    torch.manual_seed(0)
    packed, state = quantised(48, 128, device="cpu")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    dense = bnb_functional.dequantize_4bit(packed, state)
    torch.testing.assert_close(reference_matmul(x, packed, state), x @ dense.T, rtol=0, atol=0)


INTERPRETED = """
import itertools, torch, bitsandbytes.functional as F
from vrft.kernels.nf4_matmul import matmul_4bit, reference_matmul
torch.manual_seed(0)
cases = [("nf4", True, 5, 72, 256, 64, 2), ("fp4", False, 17, 40, 512, 128, 1), ("nf4", True, 3, 24, 320, 64, 3)]
for (quant_type, nested, rows, n, k, bs, split), block_k, gather, transposed in itertools.product(
    cases, (64, 128, 256), (0, 1), (0, 1)
):
    if block_k < bs:
        continue
    w = torch.randn(n, k, dtype=torch.float16)
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
    x = torch.randn(rows, k, dtype=torch.float16)
    lora_in, lora_b = torch.randn(rows, 8), torch.randn(n, 8) * 0.1
    cfg = {"BLOCK_M": 16 if rows <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": block_k,
           "SPLIT_K": min(split, -(-k // block_k)), "GATHER": gather, "TRANSPOSED": transposed}
    y = matmul_4bit(x, packed, state, None, lora_in, lora_b, 0.5, config=cfg).float()
    ref = reference_matmul(x, packed, state).float() + 0.5 * lora_in @ lora_b.T
    # fp16: one ulp (2^-10 relative) of the output plus fp32 reordering
    assert ((y - ref).abs() <= 2**-10 * ref.abs() + 1e-3).all(), (cfg, (y - ref).abs().max())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_logic_under_the_triton_interpreter():
    # The interpreter runs the kernel on CPU tensors with numpy, in fp16 (numpy has no bf16): it checks the
    # indexing, the nibble order, the double-quantised absmax, the split-K reduction, the fused LoRA term,
    # both code-book lookups, both operand orders and every tile depth, not the speed.
    numpy = pytest.importorskip("numpy")
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton 3.6's interpreter fails on numpy >= 2.4 (int() of a 1-element array)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernel is defined: a fresh process
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
