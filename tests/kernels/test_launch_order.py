"""Programmatic dependent launch (`vrft.kernels.launch_order`): when the kernels ask for it, and where in the
4-bit kernels' machine code they wait for the kernel before."""

import importlib.util

import pytest
import torch

from vrft.kernels import launch_order, nf4_mma

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def test_off_the_gpu_and_with_the_switch_off_no_kernel_asks_for_it(monkeypatch):
    assert launch_order.launch_options(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setattr(launch_order, "_hopper_or_later", lambda device: True)
    assert launch_order.launch_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(launch_order, "PROGRAMMATIC", False)
    assert launch_order.launch_options(torch.device("cuda")) == {"PDL": False, "launch_pdl": False}


def instructions(compiled) -> list[str]:
    """The compiled kernel's SASS instructions in program order."""
    from vrft.kernels.nf4_offline import instructions, sass

    return [text for _, text in instructions(sass(compiled))]


def positions(code: list[str], word: str) -> list[int]:
    return [index for index, text in enumerate(code) if word in text]


@needs_triton
def test_on_sm90_the_mma_kernel_loads_its_first_codes_before_it_waits():
    # The point of placing the wait after the first loads: the first step's codes (8-byte loads, two rows
    # of four blocks a thread) are in flight while the kernel before drains. `griddepcontrol.wait` is
    # ACQBULK in SASS, `launch_dependents` PREEXIT; no tensor-core MMA (which reads x) comes before them.
    from vrft.kernels.nf4_offline import compile_mma

    config = nf4_mma.launch_config(16, 18944, 3584, torch.device("meta"))
    compiled = compile_mma(config, arch=90, lora_rank=64, segments=3, bias=True)
    code = instructions(compiled)
    (wait,), (dependents,) = positions(code, "ACQBULK"), positions(code, "PREEXIT")
    codes_before = [text for text in code[:wait] if "LDG.E.64" in text]
    assert wait < dependents < min(positions(code, "HMMA")), (wait, dependents)
    assert len(codes_before) >= 2 * config["BLOCKS"], code[:wait]
    assert compiled.metadata.launch_pdl


@needs_triton
def test_on_sm90_nf4_matmul_waits_before_any_load_and_on_sm89_nothing_waits():
    # nf4_matmul's kernel waits at its top (its first loads are not separated from x's); the RTX 4090
    # (sm_89) has no griddepcontrol: neither kernel carries it there, and neither launches with the attribute.
    from triton.backends.compiler import GPUTarget

    from vrft.kernels.nf4_matmul import launch_config
    from vrft.kernels.nf4_offline import compile_kernel, compile_mma

    config = launch_config(16, 18944, 3584, 64, torch.device("meta"))
    hopper = instructions(compile_kernel(config))
    (wait,) = positions(hopper, "ACQBULK")
    assert wait < min(positions(hopper, "LDG")), hopper[: wait + 1]
    ada = [
        compile_kernel(config, target=GPUTarget("cuda", 89, 32)),
        compile_mma(nf4_mma.launch_config(16, 18944, 3584, torch.device("meta")), arch=89),
    ]
    for compiled in ada:
        assert "griddepcontrol" not in compiled.asm["ptx"] and not compiled.metadata.launch_pdl


@needs_triton
def test_with_x_ready_the_mma_kernel_waits_only_after_its_k_loop():
    # `x_ready` (the packed engine's matmuls after `lora_input`): the K loop's MMAs come before the wait, so
    # the loop overlaps lora_input; the LoRA term's MMAs and the stores after it.
    from vrft.kernels.nf4_offline import compile_mma, main_loop, sass

    config = nf4_mma.launch_config(16, 18944, 3584, torch.device("meta"))
    compiled = compile_mma(config, arch=90, lora_rank=64, segments=3, bias=True, x_ready=True)
    code = instructions(compiled)
    (wait,) = positions(code, "ACQBULK")
    loop = main_loop(sass(compiled))
    assert len(loop) > 400 and not any("ACQBULK" in text for text in loop), len(loop)
    mmas = positions(code, "HMMA")
    assert min(mmas) < wait < max(mmas), (wait, mmas[:3], mmas[-3:])
    assert positions(code, "STG") and wait < min(positions(code, "STG"))


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 4])
def test_the_k_loop_run_beside_lora_input_changes_no_bit_of_the_output(split_k, monkeypatch):
    # The packed engine's chain: x written by a kernel (the RMSNorm), `lora_input` of it, the 4-bit kernel
    # with `x_ready`, which starts its K loop while lora_input works. Captured in a CUDA graph as the engine
    # does; each replay and the serial launches (no programmatic launch) write the same bits.
    from tests.kernels.graphs import eager_equal_to_replays
    from tests.kernels.test_nf4_matmul import quantised
    from vrft.kernels.decode_fusions import add_rms_norm
    from vrft.kernels.lora_input import lora_input

    torch.manual_seed(0)
    packed, state = quantised(384, 1024)
    hidden = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    norm = torch.rand(1024, dtype=torch.bfloat16, device="cuda") + 0.5
    lora_a = torch.randn(64, 1024, dtype=torch.bfloat16, device="cuda") * 0.05
    lora_b = torch.randn(384, 64, device="cuda") * 0.05
    config = {**nf4_mma.launch_config(16, 384, 1024, hidden.device), "SPLIT_K": split_k}

    def chain(x_ready: bool):
        def call():
            x = add_rms_norm(hidden, None, norm, 1e-6)[1]
            lora_in = lora_input(x, lora_a)
            first = (packed, state, None, lora_b)
            return nf4_mma.launch(first, (384,), None, 64, x, lora_in, 2.0, config, x_ready=x_ready)

        return call

    overlapped = eager_equal_to_replays(chain(True))
    monkeypatch.setattr(launch_order, "PROGRAMMATIC", False)
    serial = eager_equal_to_replays(chain(False))
    torch.testing.assert_close(overlapped, serial, rtol=0, atol=0)
