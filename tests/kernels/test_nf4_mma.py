"""The shared-memory-free Gluon kernel (`vrft.kernels.nf4_mma`): its K permutation, what it compiles to, and
its outputs against bitsandbytes' dequantise-then-matmul."""

import importlib.util
import os
import types

import pytest
import torch

from tests.kernels.graphs import eager_equal_to_replays
from tests.kernels.test_nf4_matmul import assert_within_rounding, bnb_functional, dequantised, quantised
from vrft.kernels import nf4_matmul, nf4_mma, nf4_segments
from vrft.kernels.nf4_matmul import reference_matmul
from vrft.kernels.nf4_mma import PLAIN_LOADS

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def permuted_columns(blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The physical column the kernel puts at each operand column of each block, for the codes and for x:
    the kernel's joins, reshapes and permutations replayed on tensors of column numbers."""
    words = torch.arange(8 * blocks)
    physical = words[:, None] * 8 + torch.arange(8)[None, :]  # element e of word w: column 8 w + e

    def joined(nest):
        if isinstance(nest, int):
            return physical[:, nest]
        return torch.stack([joined(nest[0]), joined(nest[1])], -1)

    codes = joined(nf4_mma.CODE_JOINS)  # [8 blocks, j0, h, b]
    codes = codes.reshape(blocks, 2, 2, 2, 2, 2, 2).unsqueeze(0)  # the weight row axis, one row
    codes = codes.permute(*nf4_mma.CODES_PERMUTATION).reshape(64, blocks)
    x = torch.arange(64 * blocks)[:, None].expand(-1, 16)  # x's column numbers, 16 rows
    x = x.reshape(blocks, 2, 2, 2, 2, 2, 2, 16).permute(*nf4_mma.X_PERMUTATION).reshape(64, 16, blocks)
    return codes, x[:, 0]


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_codes_and_x_take_the_same_permutation_of_each_blocks_columns(blocks):
    codes, x = permuted_columns(blocks)
    assert torch.equal(codes, x)  # each product pairs a weight with its own x column
    for block in range(blocks):
        assert sorted(codes[:, block].tolist()) == list(range(64 * block, 64 * block + 64))
    # a thread's 16 codes of a block (lane column group t: operand columns 2 t + {0, 1} + 8 {0..7}) are 16
    # consecutive physical columns: one 8-byte load of packed codes
    for t in range(4):
        mine = [2 * t + b + 8 * i for i in range(8) for b in (0, 1)]
        assert sorted(codes[mine, 0].tolist()) == list(range(16 * t, 16 * t + 16))


@needs_triton
@pytest.mark.parametrize("arch", [90, 89])
@pytest.mark.parametrize(
    "extras",
    [
        {},
        {"lora_rank": 64, "segments": 3, "bias": True},
        {"lora_rank": 64, "segments": 2, "silu_pairs": True},
    ],
)
def test_the_main_loop_moves_no_code_through_shared_memory_and_keeps_four_programs_per_multiprocessor(
    arch, extras
):
    # What the kernel exists for (module docstring): no shared-memory writes, shuffles or barriers in the K
    # loop, its operands straight from memory into the MMA's registers, tensor-core MMAs there, no spills;
    # 128 registers leave four 4-warp programs per multiprocessor. Its only shared reads are the slice's
    # scales (`absmax_shared`: two a block and thread) and, with `x_shared` on where the kernel waits for x,
    # the slice's x (16 of 16 bytes a thread and step), which take no more than SCALES_BYTES and `x_shared`.
    from vrft.kernels.nf4_offline import compile_mma, main_loop_opcodes, registers, sass

    config = {**nf4_mma.launch_config(16, 18944, 3584, torch.device("meta")), "SPLIT_K": 4}
    for x_ready, x_reads in ((False, 16), (True, 0)):  # as `launch` chooses with it on: off with x_ready
        chosen = {**config, "x_shared": 0 if x_ready else 32768}
        compiled = compile_mma(chosen, arch=arch, x_ready=x_ready, **extras)
        loop = main_loop_opcodes(sass(compiled))
        assert loop["HMMA"] > 0, loop
        assert not {"STS", "LDSM", "BAR", "SHFL"} & set(loop), loop
        assert loop["LDS"] == 2 * config["BLOCKS"] + x_reads, (x_ready, loop)
        assert compiled.metadata.shared <= nf4_mma.SCALES_BYTES + chosen["x_shared"] + 1024, compiled.metadata
        usage = registers(compiled)
        assert usage["stack_bytes"] == 0 and usage["programs_per_sm"] >= 4, (x_ready, usage)


@needs_triton
@pytest.mark.parametrize("arch", [90, 89])
def test_the_load_variants_compile_to_fewer_loads_a_prefetch_and_no_masked_loads(arch):
    # The sweep's load variants (`MMA_DEFAULTS`), each against the kernel with all three off: one absmax
    # word a row and step replaces a byte and a second-level scale a block (2 x 2 rows x 4 blocks loads a
    # thread become 2 x 2); `prefetch` issues one L2 prefetch (CCTL) a thread and row a step; `clamp_rows`
    # masks no load; `absmax_shared` and `x_shared` read shared memory instead of loading, and write it
    # only before the loop.
    from vrft.kernels.nf4_offline import compile_mma, main_loop_opcodes, sass

    config = nf4_mma.launch_config(16, 18944, 3584, torch.device("meta"), **PLAIN_LOADS)
    loops = {}
    variants = {
        "words": {"absmax_words": True},
        "prefetch": {"prefetch": 2},
        "clamp": {"clamp_rows": True},
        "shared": {"absmax_shared": True},
        "x": {"x_shared": 32768, "SPLIT_K": 4},  # 4 steps of 8 KB a slice
    }
    for name, choices in {"plain": {}, **variants}.items():
        loops[name] = main_loop_opcodes(sass(compile_mma({**config, **choices}, arch=arch)))
        assert not {"STS", "LDSM", "BAR", "SHFL"} & set(loops[name]), (name, loops[name])
        assert ("LDS" in loops[name]) == (name in ("shared", "x")), (name, loops[name])
    assert loops["plain"]["LDG"] - loops["words"]["LDG"] == 16 - 4, loops
    # the slice's scales in shared memory: no absmax load in the loop, two shared reads a block (2 rows a
    # thread) and no barrier; the same code and x loads (8 and 16 a thread)
    assert loops["shared"]["LDG"] == 8 + 16 and loops["shared"]["LDS"] == 2 * 4, loops
    # x's slice in shared memory: x's 16 loads a thread and step become 16 shared reads of 16 bytes
    assert loops["plain"]["LDG"] - loops["x"]["LDG"] == 16 and loops["x"]["LDS"] == 16, loops
    assert "CCTL" not in loops["plain"] and loops["prefetch"]["CCTL"] == 2, loops
    # masked loads zero their registers first (CS2R); clamped rows take none
    assert loops["plain"]["CS2R"] >= 40 and "CS2R" not in loops["clamp"], loops


def test_matmul_4bit_takes_this_kernel_only_when_switched_on(monkeypatch):
    state = types.SimpleNamespace(quant_type="nf4", blocksize=64)
    x = torch.zeros(16, 1024, dtype=torch.bfloat16)
    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", False)
    assert nf4_matmul.mma_unsupported(state, x) == "VRFT_NF4_MMA=0"
    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", True)
    assert "batches of 33 sequences" in nf4_matmul.mma_unsupported(
        state, torch.zeros(33, 1024, dtype=torch.bfloat16)
    )
    reason = nf4_matmul.mma_unsupported(state, x)
    assert reason is None or "Gluon" in reason  # None where this Triton has Gluon


def test_the_switch_is_on_by_default_and_vrft_nf4_mma_0_turns_it_off(monkeypatch):
    import subprocess
    import sys

    script = "from vrft.kernels import nf4_matmul; print(nf4_matmul.MMA_KERNEL)"
    for value, expected in ((None, "True"), ("1", "True"), ("0", "False")):
        env = {k: v for k, v in os.environ.items() if k != nf4_matmul.MMA_SWITCH} | (
            {nf4_matmul.MMA_SWITCH: value} if value else {}
        )
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert result.stdout.strip() == expected
    for value in ("0", "1"):
        monkeypatch.setenv(nf4_matmul.MMA_SWITCH, value)
        nf4_matmul.check_mma_switch()
    monkeypatch.setenv(nf4_matmul.MMA_SWITCH, "off")
    with pytest.raises(ValueError, match="VRFT_NF4_MMA='off' is neither 0 nor 1: set VRFT_NF4_MMA=1"):
        nf4_matmul.check_mma_switch()


@needs_triton
def test_launch_passes_the_kernel_each_of_its_parameters_once(monkeypatch):
    # The host side on the CPU: every argument of a launch (segments, LoRA, bias, split) binds to the kernel's
    # parameters, none missing and none unknown, as Triton would bind them on the GPU.
    import inspect

    bound = {}
    kernel = inspect.signature(nf4_mma._mma_4bit_kernel.fn)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                # Triton's launch options, not kernel parameters
                kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "maxnreg", "launch_pdl")}
                bound["grid"] = grid
                bound["arguments"] = kernel.bind(*args, **kwargs)

            return launch

    monkeypatch.setattr(nf4_mma, "_mma_4bit_kernel", Recorder())
    state = types.SimpleNamespace(
        shape=(384, 1024), blocksize=64, nested=True, absmax=torch.zeros(6144, dtype=torch.uint8),
        code=torch.zeros(16), offset=torch.zeros(()), state2=types.SimpleNamespace(
            absmax=torch.zeros(24), code=torch.zeros(256), blocksize=256),
    )  # fmt: skip
    packed = torch.zeros(384 * 512, 1, dtype=torch.uint8)
    x = torch.zeros(16, 1024, dtype=torch.bfloat16)
    lora_b, lora_in = torch.zeros(384, 64), torch.zeros(16, 64, dtype=torch.bfloat16)
    config = {**nf4_mma.launch_config(16, 384, 1024, torch.device("meta")), "SPLIT_K": 2}
    y = nf4_mma.launch((packed, state, torch.zeros(384), lora_b), (384,), None, 64, x, lora_in, 2.0, config)
    arguments = bound["arguments"].arguments
    assert y.shape == (16, 384) and bound["grid"] == (6, 1, 2)
    assert (
        arguments["LORA_RANK"] == 64 and arguments["SPLIT"] and arguments["HAS_BIAS"] and arguments["NESTED"]
    )
    assert arguments["iters_per_split"] == 2 and arguments["split_k"] == 2  # 4 steps of 256 columns
    assert arguments["PDL"] is False  # off the GPU: vrft.kernels.launch_order
    # x's K slices in shared memory (`x_shared`, on by default) where `launch` picks the config: only where
    # the kernel waits for x (not with `x_ready`) and on 16-row tiles, what was timed (MMA_DEFAULTS)
    assert nf4_mma.MMA_DEFAULTS["x_shared"] == 32768
    for rows, x_ready, shared in ((16, False, True), (8, False, True), (16, True, False), (17, False, False)):
        x = torch.zeros(rows, 1024, dtype=torch.bfloat16)
        lora_in = torch.zeros(rows, 64, dtype=torch.bfloat16)
        first = (packed, state, torch.zeros(384), lora_b)
        nf4_mma.launch(first, (384,), None, 64, x, lora_in, 2.0, None, x_ready=x_ready)
        assert (bound["arguments"].arguments["X_STEPS"] > 0) == shared, (rows, x_ready)
    # a gate and an up weight with `silu_pairs`: one output of the gate's width, and the sums through the
    # workspace even unsplit
    table = torch.zeros(2, len(nf4_segments.SEGMENT_FIELDS), dtype=torch.int64)
    x = torch.zeros(16, 1024, dtype=torch.bfloat16)
    lora_in = torch.zeros(16, 128, dtype=torch.bfloat16)
    unsplit = {**config, "SPLIT_K": 1}
    y = nf4_mma.launch((packed, state, None, lora_b), (384, 384), table, 64, x, lora_in, 2.0, unsplit,
                       silu_pairs=True)  # fmt: skip
    arguments = bound["arguments"].arguments
    assert y.shape == (16, 384) and bound["grid"] == (12, 1, 1)
    assert arguments["SILU_PAIRS"] and arguments["SEGMENTS"] == 2
    assert arguments["partial_ptr"].numel() == 12 * 16 * 64
    for sizes, bias in (((384, 384, 384), None), ((384, 128), None), ((384, 384), torch.zeros(384))):
        with pytest.raises(ValueError, match="silu_pairs: takes two weights of one shape without bias"):
            nf4_mma.launch((packed, state, bias, lora_b), sizes, table, 64, x, lora_in, 2.0, unsplit,
                           silu_pairs=True)  # fmt: skip


def test_calls_outside_the_kernel_say_why():
    assert "blocksize 128" in nf4_mma.unsupported("nf4", 128, torch.bfloat16, 1024)
    assert "multiple of 64" in nf4_mma.unsupported("nf4", 64, torch.bfloat16, 1000)
    assert "float32" in nf4_mma.unsupported("nf4", 64, torch.float32, 1024)
    assert nf4_mma.unsupported("fp4", 64, torch.float16, 1024) is None
    assert "batches of 33 sequences" in nf4_mma.rows_unsupported(33)
    assert nf4_mma.rows_unsupported(32) is None


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 32])
@pytest.mark.parametrize("out_features, in_features", [(200, 320), (512, 1024), (96, 3584), (1000, 768)])
def test_kernel_equals_bitsandbytes_dequantise_then_matmul(
    quant_type, double_quant, rows, out_features, in_features
):
    # N = 200, 1000, 96 are not multiples of the 128-row tile; K = 320 is five blocks (one a loop step);
    # 17 rows take the 32-row tile.
    torch.manual_seed(0)
    packed, state = quantised(out_features, in_features, quant_type, double_quant)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(out_features, dtype=torch.bfloat16, device="cuda")
    y = nf4_mma.launch((packed, state, bias, None), (out_features,), None, 0, x, None, 1.0, None)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    reference = reference_matmul(x, packed, state, bias)
    assert_within_rounding(y, x, dequantised(packed, state), reference, state.code)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "choices",
    [
        {"BLOCKS": 1},
        {"BLOCKS": 2, "BLOCK_N": 128},
        {"BLOCK_N": 256, "BLOCKS": 2},
        {"BLOCKS": 1, "maxnreg": 64},  # register caps
        {"BLOCKS": 2, "maxnreg": 80},
        {"BLOCK_N": 16, "num_warps": 1},  # one-warp programs
        {"BLOCK_N": 32, "num_warps": 2},
        {"BLOCK_N": 32, "num_warps": 1, "BLOCKS": 2, "clamp_rows": True},  # two row repeats a warp
    ],
)
def test_every_tile_and_step_equals_bitsandbytes_in_fp16_too(choices):
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        weight = torch.randn(512, 2048, dtype=dtype, device="cuda") * 0.05
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        x = torch.randn(16, 2048, dtype=dtype, device="cuda")
        config = nf4_mma.launch_config(16, 512, 2048, x.device, **choices)
        y = nf4_mma.launch((packed, state, None, None), (512,), None, 0, x, None, 1.0, config)
        assert_within_rounding(
            y, x, dequantised(packed, state), reference_matmul(x, packed, state), state.code
        )


SEGMENT_RANKS, SEGMENT_STARTS = (16, 16, 64), (0, 16, 32)  # LoRA ranks, their columns of the shared x A^T


def segments_case(sizes: tuple[int, ...], rows: int, in_features: int):
    """Three weights `[n, in_features]` with biases and LoRA B matrices (`SEGMENT_RANKS` at `SEGMENT_STARTS`
    of a shared `x A^T`), `x [rows, in_features]`, that product and the weights' segment table (CUDA)."""
    ranks, starts = SEGMENT_RANKS, SEGMENT_STARTS
    weights = [quantised(n, in_features) for n in sizes]
    biases = [torch.randn(n, dtype=torch.bfloat16, device="cuda") for n in sizes]
    lora_bs = [torch.randn(n, r, device="cuda") * 0.05 for n, r in zip(sizes, ranks, strict=True)]
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
    product = torch.randn(rows, sum(ranks), device="cuda").to(torch.bfloat16)
    group = nf4_segments.segments(
        [(p, s, b, lb, c) for (p, s), b, lb, c in zip(weights, biases, lora_bs, starts, strict=True)]
    )
    return weights, biases, lora_bs, x, product, group


@pytest.mark.gpu
@pytest.mark.parametrize(
    "choices",
    [
        {"absmax_words": True},
        {"absmax_words": True, "BLOCKS": 2},
        {"absmax_words": True, "BLOCKS": 1},
        {"prefetch": 1},
        {"prefetch": 4},
        {"absmax_words": True, "prefetch": 2},
        {"absmax_words": True, "prefetch": 2, "BLOCKS": 2},
        {"prefetch": 1, "BLOCKS": 1},
        {"clamp_rows": True},
        {"clamp_rows": True, "absmax_words": True, "prefetch": 2},
        {"clamp_rows": True, "BLOCKS": 1},
        {"clamp_rows": True, "absmax_words": True, "BLOCKS": 2, "maxnreg": 80},
        {"absmax_shared": True},
        {"absmax_shared": True, "BLOCKS": 2},
        {"absmax_shared": True, "BLOCKS": 1},
        {"absmax_shared": True, "clamp_rows": True},
        {"x_shared": 65536},
        {"x_shared": 65536, "BLOCKS": 2},
        {"x_shared": 65536, "BLOCKS": 1},
        {"x_shared": 65536, "absmax_shared": True, "clamp_rows": True},
        {"x_shared": 65536, "absmax_shared": True, "absmax_words": True, "BLOCKS": 2},
    ],
)
@pytest.mark.parametrize("rows", [8, 17])
def test_the_load_variants_change_no_bit_of_the_output(choices, rows):
    # They only move loads (or read rows whose sums are never stored): the same scales (the same fp32
    # expression), the same products summed in the same order. A segments launch with bias, LoRA and a K
    # split; K = 1280 so the split's last slice is short, 136 rows so a tile runs past a weight's end, and
    # 8 and 17 rows so x ends inside a tile.
    torch.manual_seed(0)
    sizes = (384, 128, 136)
    weights, biases, lora_bs, x, product, group = segments_case(sizes, rows, 1280)
    choices = {**PLAIN_LOADS, **choices}
    blocks = {**PLAIN_LOADS, "BLOCKS": choices["BLOCKS"]} if "BLOCKS" in choices else PLAIN_LOADS
    outputs = []
    for chosen in (blocks, choices):
        config = {**nf4_mma.launch_config(rows, sum(sizes), 1280, x.device, **chosen), "SPLIT_K": 2}
        outputs.append(
            nf4_mma.launch(
                group.first, group.out_features, group.table, group.lora_rank, x, product, 2.0, config
            )
        )
    assert torch.equal(outputs[0], outputs[1])
    packed, state = weights[0]  # and against bitsandbytes, alone
    config = nf4_mma.launch_config(rows, 384, 1280, x.device, **choices)
    y = nf4_mma.launch((packed, state, None, None), (384,), None, 0, x, None, 1.0, config)
    assert_within_rounding(y, x, dequantised(packed, state), reference_matmul(x, packed, state), state.code)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("rank", [8, 64])
def test_fused_lora_term_and_split_k_reduction_under_graph_replay(split_k, rank):
    torch.manual_seed(0)
    packed, state = quantised(384, 1024)
    x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    lora_a = torch.randn(rank, 1024, device="cuda") * 0.05
    lora_b = torch.randn(384, rank, device="cuda") * 0.05
    shared_a = torch.cat([torch.randn(8, 1024, device="cuda") * 0.05, lora_a])
    lora_in = (x.float() @ shared_a.T)[:, 8:]  # strided rows, as the packed engine passes them
    config = {**nf4_mma.launch_config(16, 384, 1024, x.device), "SPLIT_K": split_k}

    def call():
        return nf4_mma.launch((packed, state, None, lora_b), (384,), None, rank, x, lora_in, 2.0, config)

    eager = eager_equal_to_replays(call)
    lora = 2.0 * lora_in @ lora_b.T
    reference = (reference_matmul(x, packed, state).float() + lora).to(torch.bfloat16)
    assert_within_rounding(
        eager, x, dequantised(packed, state), reference, state.code, lora=(2.0, lora_in, lora_b)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 16, 32])
def test_one_launch_over_several_weights_equals_their_own_launches(rows):
    torch.manual_seed(0)
    sizes = (384, 128, 128)
    weights, biases, lora_bs, x, product, group = segments_case(sizes, rows, 1024)
    config = nf4_mma.launch_config(rows, sum(sizes), 1024, x.device)
    together = nf4_mma.launch(
        group.first, group.out_features, group.table, group.lora_rank, x, product, 2.0, config
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nf4_matmul, "MMA_KERNEL", True)
        routed = nf4_matmul.matmul_4bit_segments(x, group, product, 2.0)  # no config: routed to this kernel
    torch.testing.assert_close(routed, together, rtol=0, atol=0)
    column = 0
    for (packed, state), bias, lora_b, start, rank in zip(
        weights, biases, lora_bs, SEGMENT_STARTS, SEGMENT_RANKS, strict=True
    ):
        n = state.shape[0]
        lora_in = product[:, start : start + rank]
        alone = nf4_mma.launch((packed, state, bias, lora_b), (n,), None, rank, x, lora_in, 2.0, config)
        torch.testing.assert_close(together[:, column : column + n], alone, rtol=0, atol=0)
        column += n


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 16, 17, 32])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("rank", [0, 64])
def test_the_gate_up_launch_writes_silu_gate_times_up_bit_for_bit_under_graph_replay(rows, split_k, rank):
    # `silu_pairs`: the gate's and the up's sums of a tile go through the workspace, the last of their K
    # slices rounds both as the unfolded launch's store does and applies decode_fusions' SiLU: bit for bit
    # `silu_mul` of the two outputs of the same launch without it (the same partials, summed in the same
    # order; the same fp32 SiLU). 136 rows a weight so a tile runs past its end, K = 1280 so a split of 3
    # has a short last slice, 17 rows for the 32-row tiles; each replay of a graph must give it again
    # (the pair counters back at zero).
    from vrft.kernels import decode_fusions

    torch.manual_seed(0)
    sizes = (136, 136)
    weights = [quantised(n, 1280) for n in sizes]
    lora_bs = [torch.randn(n, 64, device="cuda") * 0.05 if rank else None for n in sizes]
    x = torch.randn(rows, 1280, dtype=torch.bfloat16, device="cuda")
    product = torch.randn(rows, 128, device="cuda").to(torch.bfloat16) if rank else None
    group = nf4_segments.segments(
        [(p, s, None, lb, c) for (p, s), lb, c in zip(weights, lora_bs, (0, 64), strict=True)]
    )
    config = {**nf4_mma.launch_config(rows, sum(sizes), 1280, x.device), "SPLIT_K": split_k}

    def call(silu_pairs):
        return nf4_mma.launch(
            group.first, group.out_features, group.table, group.lora_rank, x, product, 2.0, config,
            silu_pairs=silu_pairs,
        )  # fmt: skip

    folded = eager_equal_to_replays(lambda: call(True))
    both = call(False)
    assert folded.shape == (rows, 136)
    torch.testing.assert_close(folded, decode_fusions.silu_mul(both[:, :136], both[:, 136:]), rtol=0, atol=0)
    if split_k == 2 and rank:  # matmul_4bit_silu, no config: the launch as `launch` configures it
        routed = nf4_matmul.matmul_4bit_silu(x, group, product, 2.0, x_ready=True)
        unfolded = nf4_matmul.matmul_4bit_segments(x, group, product, 2.0, x_ready=True)
        expected = decode_fusions.silu_mul(unfolded[:, :136], unfolded[:, 136:])
        torch.testing.assert_close(routed, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_matmul_4bit_routes_decode_batches_here_and_wider_ones_to_its_own_kernel(monkeypatch):
    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", True)
    torch.manual_seed(0)
    packed, state = quantised(512, 1024)
    for rows, mine in ((16, True), (64, False)):
        x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
        routed = nf4_matmul.matmul_4bit(x, packed, state)
        if mine:
            expected = nf4_mma.launch((packed, state, None, None), (512,), None, 0, x, None, 1.0, None)
        else:
            config = nf4_matmul.launch_config(rows, 512, 1024, 64, x.device)
            expected = nf4_matmul.matmul_4bit(x, packed, state, config=config)
        torch.testing.assert_close(routed, expected, rtol=0, atol=0)


@needs_triton
def test_every_variant_of_the_sweep_compiles_for_sm_90(monkeypatch):
    # bench/rollout/mma_sweep.py runs on a scarce device: a variant that does not compile (a misspelt switch
    # reaches the kernel as a missing constexpr) is found here, on the CPU, before the device call.
    import sys
    from pathlib import Path

    from vrft.kernels.nf4_offline import compile_mma

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench" / "rollout"))
    sweep = __import__("mma_sweep")
    try:
        for variant in sweep.VARIANTS:
            assert set(variant) <= set(nf4_mma.MMA_DEFAULTS), variant
            config = nf4_mma.launch_config(16, 18944, 3584, torch.device("meta"), **variant)
            assert compile_mma({**config, "SPLIT_K": 4}, arch=90).asm["cubin"], variant
    finally:
        sys.modules.pop("mma_sweep", None)
        sys.modules.pop("kernel_sweep", None)


@needs_triton
def test_every_stage_of_the_anatomy_compiles_for_sm_90(monkeypatch):
    # bench/rollout/mma_anatomy.py, as the sweep above: a stage that does not compile is found before the
    # device call. And each stage is what its name says: the loads-only stages multiply nothing, the wide
    # ones load 16 bytes a thread (the codes' 8 otherwise), and only the stages with x load it.
    import sys
    from pathlib import Path

    from vrft.kernels.nf4_offline import compile_gluon, compile_mma, instructions, mnemonic, sass

    root = Path(__file__).resolve().parents[2] / "bench"
    monkeypatch.syspath_prepend(str(root / "rollout"))
    monkeypatch.syspath_prepend(str(root / "memory"))
    anatomy = __import__("mma_anatomy")
    try:
        config = {**nf4_mma.launch_config(16, 37888, 3584, torch.device("meta")), "SPLIT_K": 2}
        pointers = {
            "x_ptr": "X", "packed_ptr": "i32", "absmax_ptr": "u8", "code_ptr": "fp32", "absmax2_ptr": "fp32",
            "code2_ptr": "fp32", "offset_ptr": "fp32", "sums_ptr": "fp32", "bits_ptr": "i32",
        }  # fmt: skip
        for stage, (decode, load_x, _, _, wide, _) in anatomy.STAGES.items():
            compiled = compile_gluon(
                anatomy._anatomy_kernel, anatomy.stage_constants(stage, config), pointers, 4, 90, "bf16", 128
            )
            listed = [text for _, text in instructions(sass(compiled))]
            loads = {mnemonic(text) for text in listed if "LDG" in text}
            multiplies = any("HMMA" in text for text in listed)
            assert multiplies == bool(decode), stage
            assert ("LDG.E.128" in loads) == bool(load_x or wide), (stage, loads)
            assert ("LDG.E.64" in loads) == (not wide), (stage, loads)
        mma, operand_a, operand_b, _, x_layout, _ = nf4_mma.layouts(64, 16, 4, 4)
        for wide in (False, True):  # the persistent kernel's loads stage (`anatomy.persistent`, DECODE 0)
            words = anatomy.wide_words() if wide else nf4_mma.layouts(64, 16, 4, 4)[3]
            constants = {
                "DECODE": 0, "SCALED": False, "NESTED_BLOCKSIZE": 256, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCKS": 4,
                "MMA": mma, "A": operand_a, "B": operand_b, "WORDS": words, "XL": x_layout,
            }  # fmt: skip
            compiled = compile_gluon(anatomy._persistent_kernel, constants, pointers, 4)
            loads = {mnemonic(text) for _, text in instructions(sass(compiled)) if "LDG" in text}
            assert loads == {"LDG.E.128" if wide else "LDG.E.64"}, loads
        for name, choices in anatomy.KERNEL_VARIANTS.items():  # `--kernels`: the kernel's own switches
            assert set(choices) <= set(nf4_mma.MMA_DEFAULTS), name
            for out_features, in_features in anatomy.SHAPES.values():
                config = nf4_mma.launch_config(16, out_features, in_features, torch.device("meta"), **choices)
                assert compile_mma(config, in_features=in_features).asm["cubin"], (name, out_features)
    finally:
        for module in ("mma_anatomy", "kernel_sweep", "speed"):
            sys.modules.pop(module, None)


@needs_triton
def test_the_slice_scales_take_shared_memory_only_where_switched_on_and_small():
    # `absmax_shared` keeps the K slice's scales in shared memory, a power of two of blocks a row: gate/up at
    # 16 rows split 2 is 7 steps of 4 blocks (32 x 64 rows x 4 bytes = 8 KB), unsplit 14 steps (16 KB, the
    # most SCALES_BYTES allows); down unsplit, 74 steps, would take 128 KB and keeps its per-step loads; off,
    # none.
    config = {
        **nf4_mma.launch_config(16, 37888, 3584, torch.device("meta"), absmax_shared=True),
        "SPLIT_K": 2,
    }
    assert nf4_mma.slice_scales(config, 3584)["SLICE_BLOCKS"] == 32
    assert nf4_mma.slice_scales({**config, "SPLIT_K": 1}, 3584)["SLICE_BLOCKS"] == 64
    assert nf4_mma.slice_scales({**config, "SPLIT_K": 1}, 18944)["SLICE_BLOCKS"] == 0
    assert nf4_mma.slice_scales({**config, "absmax_shared": False}, 3584)["SLICE_BLOCKS"] == 0
