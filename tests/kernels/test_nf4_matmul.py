"""The fused 4-bit matmul kernel against bitsandbytes' dequantise-then-matmul, and its refusals."""

import importlib.util
import types

import pytest
import torch

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.interpreter import interpreted
from vrft.kernels import nf4_matmul, nf4_segments
from vrft.kernels.nf4_matmul import (
    environment_unsupported,
    launch_config,
    layout_unsupported,
    reference_matmul,
    supports,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def quantised(out_features, in_features, quant_type="nf4", double_quant=True, blocksize=64, device="cuda"):
    """A random bf16 weight `[N, K]` quantised as `Linear4bit` stores it: `(packed, quant_state)`."""
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device) * 0.05
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def dequantised(packed, state):
    return bnb_functional.dequantize_4bit(packed, state)


def assert_within_rounding(y, x, weight, reference, code=None, label="", lora=None):
    """`y` is `reference`, `x` times bitsandbytes' dequantised `weight`, up to rounding, as derived below.

    With `u` the unit roundoff of the compute dtype (bf16 2^-8, fp16 2^-11): scaling each weight before the
    dot, both sides multiply the same inputs by the same weights (code * absmax in fp32, rounded once) and
    accumulate in fp32; they differ in the order of that accumulation and in the one final rounding of each
    side. So: 2u |reference|, plus the fp32 reordering error, at most K 2^-24 of sum_k |x_k w_k| (2^-12 of it
    covers K up to 4096 with a margin).

    `code`, the code book, given when the kernel scales after the dot: its weight is rnd(c) a instead of rnd(c a), for code c
    and fp32 absmax a. |rnd(c) - c| <= e |c|, e the largest relative error of rounding one of the 16 codes to
    the compute dtype (at most u; computed from the code book), and |rnd(c a) - c a| <= u |c a|, so the two
    weights differ by at most (e + u) |c a| <= (e + u) / (1 - u) |w| (w the reference weight), and the sums
    by that times sum_k |x_k w_k|: a third term of the same order as the other two, not a looser tolerance.

    `lora`, the fused adapter's `(scale, lora_in, lora_b)` when the reference adds it in fp32: the kernel
    rounds both operands to the compute dtype (as autocast does) and sums in fp32, so each product is off by
    at most (2u + u^2) of |scale a b|, and the rank-long fp32 sum by 2^-12 of it as above: a fourth term,
    (2u + u^2 + 2^-12) scale sum_r |a_r b_r|.
    """
    unit = torch.finfo(x.dtype).eps / 2  # unit roundoff: half the gap above 1
    magnitude = x.float().abs() @ weight.float().abs().T
    bound = 2 * unit * reference.float().abs() + 2**-12 * magnitude
    if code is not None:
        code = code.float()
        relative = (code.to(x.dtype).float() - code).abs() / code.abs().clamp_min(
            torch.finfo(torch.float32).tiny
        )
        bound = bound + (relative.max() + unit) / (1 - unit) * magnitude
    if lora is not None:
        scale, lora_in, lora_b = lora
        adapter = abs(scale) * lora_in.float().abs() @ lora_b.float().abs().T
        bound = bound + (2 * unit + unit**2 + 2**-12) * adapter
    excess = (y.float() - reference.float()).abs() - bound
    assert excess.max() <= 0, f"{label} worst excess over the bound {excess.max():.3g}"


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
    config = nf4_matmul.launch_config(rows, out_features, in_features, blocksize, x.device)
    code = state.code if config["SCALE_AFTER"] else None
    assert_within_rounding(y, x, dequantised(packed, state), reference_matmul(x, packed, state, bias), code)


# Every kernel variant the sweep (bench/rollout/kernel_sweep.py) can pick for DEFAULTS, as launch_config
# overrides; the test above runs the whole matrix on DEFAULTS, this one a cross-section on each variant.
# Each names its decoder and scaling in full: DEFAULTS changes with the sweep, the variants stay what they say.
VARIANTS = {
    "words": {"DECODE": 0, "SCALE_AFTER": 0},
    "words_scale_after": {"DECODE": 0, "SCALE_AFTER": 1},
    "bytes": {"DECODE": 1, "SCALE_AFTER": 0},
    "bytes_scale_after": {"DECODE": 1, "SCALE_AFTER": 1},
    "prmt": {"DECODE": 2, "SCALE_AFTER": 1},
    "prmt_x_left_wide": {"DECODE": 2, "SCALE_AFTER": 1, "TRANSPOSED": 0, "BLOCK_N": 128, "BLOCK_K": 256},
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "quant_type, double_quant, rows, out_features, in_features, blocksize, dtype",
    [
        ("nf4", True, 1, 200, 320, 64, torch.bfloat16),  # N off the tile, a 5-block row, one row
        ("fp4", False, 33, 1000, 768, 128, torch.bfloat16),  # M not a power of two, blocksize 128
        ("nf4", False, 16, 72, 1024, 256, torch.bfloat16),  # blocksize 256
        ("fp4", True, 16, 3584, 3584, 64, torch.bfloat16),  # Qwen2-VL-7B's q/o: every mask folded (EVEN)
        ("nf4", True, 64, 512, 1024, 64, torch.float16),  # fp16 codes
    ],
)
def test_every_variant_equals_bitsandbytes_dequantise_then_matmul(
    variant, quant_type, double_quant, rows, out_features, in_features, blocksize, dtype
):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=dtype, device="cuda") * 0.05
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    x = torch.randn(rows, in_features, dtype=dtype, device="cuda")
    bias = torch.randn(out_features, dtype=dtype, device="cuda")
    choices = VARIANTS[variant]
    config = nf4_matmul.launch_config(rows, out_features, in_features, blocksize, x.device, **choices)
    y = nf4_matmul.matmul_4bit(x, packed, state, bias, config=config)
    reference = reference_matmul(x, packed, state, bias)
    code = state.code if config["SCALE_AFTER"] else None
    assert_within_rounding(y, x, dequantised(packed, state), reference, code)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["words", "prmt"])
@pytest.mark.parametrize("split_k", [1, 2, 8])
@pytest.mark.parametrize("rank", [8, 64])  # 64: four 16-rank dots of the LoRA term
def test_fused_lora_term_and_split_k_reduction_under_graph_replay(variant, split_k, rank):
    torch.manual_seed(0)
    packed, state = quantised(384, 1024)
    x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    lora_a = torch.randn(rank, 1024, device="cuda") * 0.05  # fp32 adapter, as the precision plugin keeps it
    lora_b = torch.randn(384, rank, device="cuda") * 0.05
    # x A^T as the packed engine passes it: the columns of one product shared with other projections (rows
    # strided by the other 8 ranks)
    shared_a = torch.cat([torch.randn(8, 1024, device="cuda") * 0.05, lora_a])
    lora_in = (x.float() @ shared_a.T)[:, 8:]
    config = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3}
    config.update(VARIANTS[variant])

    def call():
        return nf4_matmul.matmul_4bit(x, packed, state, None, lora_in, lora_b, 2.0, config=config)

    eager = eager_equal_to_replays(call)
    lora = 2.0 * lora_in @ lora_b.T
    reference = (reference_matmul(x, packed, state).float() + lora).to(torch.bfloat16)
    code = state.code if VARIANTS[variant].get("SCALE_AFTER") else None
    assert_within_rounding(eager, x, dequantised(packed, state), reference, code, lora=(2.0, lora_in, lora_b))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 16, 64])
def test_one_launch_over_several_weights_equals_their_own_launches_under_graph_replay(rows):
    # q/k/v as the packed engine launches them: three weights of one input, biases, per-weight adapters
    # reading their columns of one shared x A^T; the launch_config of their total width for both.
    torch.manual_seed(0)
    sizes, ranks = (384, 128, 128), (16, 16, 64)
    weights = [quantised(n, 1024) for n in sizes]
    biases = [torch.randn(n, dtype=torch.bfloat16, device="cuda") for n in sizes]
    lora_bs = [torch.randn(n, r, device="cuda") * 0.05 for n, r in zip(sizes, ranks, strict=True)]
    starts = (0, 16, 32)
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    product = torch.randn(rows, sum(ranks), device="cuda").to(torch.bfloat16)
    group = nf4_segments.segments(
        [(p, s, b, lb, c) for (p, s), b, lb, c in zip(weights, biases, lora_bs, starts, strict=True)]
    )
    config = launch_config(rows, sum(sizes), 1024, 64, x.device)  # this module's kernel (no config: nf4_mma)

    def call():
        return nf4_matmul.matmul_4bit_segments(x, group, product, 2.0, config=config)

    eager = eager_equal_to_replays(call)
    column = 0
    for (packed, state), bias, lora_b, start, rank in zip(
        weights, biases, lora_bs, starts, ranks, strict=True
    ):
        n = state.shape[0]
        lora_in = product[:, start : start + rank]
        alone = nf4_matmul.matmul_4bit(x, packed, state, bias, lora_in, lora_b, 2.0, config=config)
        mine = eager[:, column : column + n]
        torch.testing.assert_close(mine, alone, rtol=0, atol=0)  # the same sums, the same order
        lora = 2.0 * lora_in.float() @ lora_b.T
        reference = (reference_matmul(x, packed, state).float() + bias.float() + lora).to(torch.bfloat16)
        assert_within_rounding(
            mine, x, dequantised(packed, state), reference, state.code, lora=(2.0, lora_in, lora_b)
        )
        column += n


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_one_launch_over_several_weights_keeps_the_kernels_registers_and_load_widths():
    # The segment table's pointers are loaded at run time: without alignment hints the packed codes' copies
    # to shared memory compiled 4 bytes wide instead of 8 (sm_90 PTX). Same widths, same count, and as many
    # programs per multiprocessor as one weight's launch (both with bias and a rank-64 adapter, as q/k/v).
    import re

    from vrft.kernels.nf4_offline import compile_kernel, registers

    config = {**launch_config(16, 4608, 3584, 64, torch.device("meta")), "SPLIT_K": 8}
    copies = {}
    for count in (0, 3):
        compiled = compile_kernel(config, bias=True, lora_rank=64, segments=count)
        widths = re.findall(
            r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", compiled.asm["ptx"]
        )
        copies[count] = (sorted(widths), registers(compiled))
    assert copies[3][0] == copies[0][0] and "0x8" in copies[0][0], copies
    assert copies[3][1]["programs_per_sm"] >= copies[0][1]["programs_per_sm"], copies
    assert copies[3][1]["stack_bytes"] == 0, copies


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("rows", [16, 64])
def test_fused_lora_term_costs_the_kernel_no_registers(rows):
    # Compiled for sm_90 on any machine (nf4_offline: Triton's own ptxas). Registers decide how many programs
    # share a multiprocessor; the LoRA term used to add 42 at 16 rows (126 -> 168: 3 programs per SM
    # instead of 4). Added after the K loop, 16 ranks per tensor-core dot, it costs no program, at any rank.
    from vrft.kernels.nf4_offline import compile_kernel, registers

    config = launch_config(rows, 18944, 3584, 64, torch.device("meta"))
    bare = registers(compile_kernel(config))
    for rank in (64, 256):
        fused = registers(compile_kernel(config, lora_rank=rank))
        assert fused["programs_per_sm"] == bare["programs_per_sm"] and fused["stack_bytes"] == 0, (
            rank,
            fused,
            bare,
        )


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
import itertools, sys, torch, bitsandbytes.functional as F
from vrft.kernels.nf4_matmul import matmul_4bit
torch.manual_seed(0)
cases = [  # quant type, nested, M, N, K, blocksize, K split; BLOCK_N is 32
    ("nf4", True, 5, 72, 256, 64, 2),  # N off the tile, nested absmax, a split K
    ("fp4", False, 17, 64, 512, 128, 2),  # M not a power of two; N and K on the tiles (EVEN: no masks)
    ("nf4", True, 3, 24, 320, 64, 3),  # K = 320: a partial last step at BLOCK_K 128, a split of 3
]
variants = [  # DECODE, SCALE_AFTER, GATHER, TRANSPOSED
    (0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 1, 1), (0, 1, 0, 0), (1, 0, 1, 0),
    (1, 0, 0, 1), (1, 1, 1, 1), (1, 1, 0, 0), (2, 1, 1, 1), (2, 1, 1, 0),
]
results = []
for (quant_type, nested, rows, n, k, bs, split), (decode, after, gather, transposed), deeper in itertools.product(
    cases, variants, (False, True)
):
    w = torch.randn(n, k, dtype=torch.float16)
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
    x = torch.randn(rows, k, dtype=torch.float16)
    rank = 40 if deeper else 8  # 40: three chunks of the LoRA term's rank loop, the last one masked
    # lora_in as the packed engine passes it: a column slice of the x A^T shared by q/k/v (strided rows)
    lora_in, lora_b = torch.randn(rows, rank + 16)[:, 16:], torch.randn(n, rank) * 0.1
    block_k = 2 * bs if deeper else bs
    cfg = {"BLOCK_M": 16 if rows <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": block_k,
           "SPLIT_K": min(split, -(-k // block_k)), "GATHER": gather, "TRANSPOSED": transposed,
           "DECODE": decode, "SCALE_AFTER": after}
    y = matmul_4bit(x, packed, state, None, lora_in, lora_b, 0.5, config=cfg)
    weight = F.dequantize_4bit(packed, state)
    reference = (x.float() @ weight.float().T + 0.5 * lora_in @ lora_b.T).to(torch.float16)
    results.append({"label": f"{quant_type} {cfg}", "y": y, "x": x, "weight": weight, "reference": reference,
                    "code": state.code if after else None, "lora": (0.5, lora_in, lora_b)})
torch.save(results, sys.argv[1])
"""


INTERPRETED_SEGMENTS = """
import sys, torch, bitsandbytes.functional as F
from vrft.kernels.nf4_matmul import matmul_4bit, matmul_4bit_segments
from vrft.kernels.nf4_segments import segments
torch.manual_seed(0)
results = []
for nested, quant_type, k, block_k, split, variant in [
    (True, "nf4", 320, 128, 3, (2, 1, 1, 1)),  # byte permutes; K = 320: a partial last step; split of 3
    (False, "fp4", 256, 64, 1, (0, 0, 1, 1)),  # int32 words, scaled per weight; no split
    (True, "nf4", 256, 64, 4, (1, 1, 0, 0)),  # bytes, x as the left operand; 4 slices of the rank-40 term
]:
    sizes, ranks = (72, 32, 40), (8, 8, 40)  # 72: off the 32-wide tile (masked); per-weight ranks
    weights = [F.quantize_4bit(torch.randn(n, k, dtype=torch.float16), blocksize=64,
                               compress_statistics=nested, quant_type=quant_type) for n in sizes]
    biases = [torch.randn(n, dtype=torch.float16) for n in sizes]
    lora_bs = [torch.randn(n, r) * 0.1 for n, r in zip(sizes, ranks)]
    x = torch.randn(5, k, dtype=torch.float16)
    product = torch.randn(5, sum(ranks))  # the shared x A^T; each weight reads its columns
    starts = (0, 8, 16)
    group = segments([(p, s, b, lb, c) for (p, s), b, lb, c in zip(weights, biases, lora_bs, starts)])
    decode, after, gather, transposed = variant
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": split, "GATHER": gather,
           "TRANSPOSED": transposed, "DECODE": decode, "SCALE_AFTER": after}
    y = matmul_4bit_segments(x, group, product, 0.5, config=cfg)
    column = 0
    for (p, s), b, lb, c, r, n in zip(weights, biases, lora_bs, starts, ranks, sizes):
        lora_in = product[:, c:c + r]
        alone = matmul_4bit(x, p, s, b, lora_in, lb, 0.5, config=cfg)
        weight = F.dequantize_4bit(p, s)
        reference = (x.float() @ weight.float().T + b.float() + 0.5 * lora_in @ lb.T).to(torch.float16)
        results.append({"label": f"{quant_type} {n} {cfg}", "y": y[:, column:column + n], "alone": alone,
                        "x": x, "weight": weight, "reference": reference, "code": s.code if after else None,
                        "lora": (0.5, lora_in, lb)})
        column += n
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_one_launch_over_several_weights_equals_a_launch_per_weight_under_the_interpreter(tmp_path):
    # The segment table's indexing: each weight's tiles, masks off its own N, its bias, its LoRA B, rank and
    # columns of the shared x A^T, and its place in the output; the same sums as alone, bit for bit.
    results = interpreted(INTERPRETED_SEGMENTS, tmp_path / "results.pt")
    assert len(results) == 9
    for case in results:
        torch.testing.assert_close(case["y"], case["alone"], rtol=0, atol=0, msg=case["label"])
        assert_within_rounding(
            case["y"], case["x"], case["weight"], case["reference"], case["code"], case["label"], case["lora"]
        )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_logic_under_the_triton_interpreter(tmp_path):
    # The interpreter runs the kernel on CPU tensors with numpy, in fp16. Not bf16, which numpy lacks: Triton
    # 3.6's interpreter returns garbage for `tl.dot` of bf16 operands (a 16 x 16 x 16 product of randn values
    # off by ~1e10) and rounds fp32 -> bf16 towards zero where the GPU and torch round to nearest (-13/15
    # becomes -0.86328125, not -0.8671875). On the GPU, bf16 is tested. It checks the indexing, the nibble
    # order of all three decoders (the byte-permute one through its table words, as the interpreter runs no
    # PTX: tests/kernels/test_nf4_decode.py runs the PTX itself), both absmax modes, the double-quantised
    # absmax, the split-K reduction, the fused LoRA term (read from strided rows), both code-book lookups,
    # both operand orders, one and two quantisation blocks per step, and the masks, not the speed.
    results = interpreted(INTERPRETED, tmp_path / "results.pt")
    assert len(results) == 60
    for case in results:
        assert_within_rounding(
            case["y"], case["x"], case["weight"], case["reference"], case["code"], case["label"], case["lora"]
        )
