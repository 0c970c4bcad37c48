"""bench/memory/speed.py: its engine suffixes, which set a switch or take one part out of the decode step
while an engine generates and only then (bench/rollout/results.md, "The decode step with parts taken
out"), and the bandwidth its "% of bound" divides by."""

import torch

from tests.support import bench_module


def innermost(engine):
    """The engine that `speed.engine_for`'s stacked suffixes wrap."""
    while hasattr(engine, "_engine"):
        engine = engine._engine
    return engine


def test_the_engine_suffixes_set_the_switch_for_a_generate_and_put_it_back(monkeypatch):
    # `packed:mma` / `packed:nf4_matmul` time the packed engine with either kernel in one run; the switch
    # holds during `generate` (where the engine captures its CUDA graph) and only then.
    speed = bench_module("bench/memory/speed.py")
    from vrft.kernels import launch_order, nf4_matmul

    monkeypatch.setattr(nf4_matmul, "MMA_KERNEL", False)
    seen = []
    # (on `bf16_copy`, which builds without CUDA: `packed` refuses a machine without Triton before it starts;
    # `:serial` turns programmatic dependent launch off, and stacks on the kernel's suffix)
    for name, expected in (
        ("bf16_copy:mma", (True, True)),
        ("bf16_copy:nf4_matmul", (False, True)),
        ("bf16_copy:mma:serial", (True, False)),
    ):
        engine = speed.engine_for(name)
        inner = innermost(engine)
        assert type(inner).__name__ == "Bf16CopyEngine", type(inner)
        monkeypatch.setattr(
            inner, "generate", lambda *a, **k: seen.append((nf4_matmul.MMA_KERNEL, launch_order.PROGRAMMATIC))
        )
        engine.generate()
        assert seen[-1] == expected, name
        assert nf4_matmul.MMA_KERNEL is False and launch_order.PROGRAMMATIC is True
    # "% of bound" is of the card the run has: the H100 of results/default_on_call/ has 3.35 TB/s
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, bandwidth in (
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA GeForce RTX 4090", 1.008e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert speed.device_bandwidth() == (name, bandwidth)


def test_the_ablations_take_their_part_out_for_a_generate_and_put_it_back(monkeypatch):
    speed = bench_module("bench/memory/speed.py")
    from vrft.kernels import decode_fusions
    from vrft.rollout import packed, stages

    def current():
        return stages.decode_attention, decode_fusions.silu_mul, packed.lora_input, packed.matmul_4bit

    before = current()
    monkeypatch.setattr(packed, "FOLD_SILU", True)  # `:free_silu` turns the folded SiLU off too
    # on `bf16_copy`, which builds without CUDA (`packed` refuses a machine without Triton); suffixes stack
    engine = speed.engine_for("bf16_copy:free_lora_input:x_waits:free_attention:free_silu")
    inner = innermost(engine)
    assert type(inner).__name__ == "Bf16CopyEngine"
    seen = []
    monkeypatch.setattr(inner, "generate", lambda *a, **k: seen.append((current(), packed.FOLD_SILU)))
    engine.generate()
    (attention, silu_mul, product, matmul), folded = seen[0]
    assert all(during is not original for during, original in zip(seen[0][0], before, strict=True))
    assert not folded
    assert current() == before and packed.FOLD_SILU is True
    for suffix, fold in ((":fold_silu", True), (":unfold_silu", False)):
        monkeypatch.setattr(packed, "FOLD_SILU", not fold)
        engine = speed.engine_for("bf16_copy" + suffix)
        monkeypatch.setattr(innermost(engine), "generate", lambda *a, **k: seen.append(packed.FOLD_SILU))
        engine.generate()
        assert seen[-1] is fold and packed.FOLD_SILU is not fold
    q, gate = torch.randn(2, 4), torch.randn(3, 5)
    assert attention(q, "keys", "values") is q and silu_mul(gate, None) is gate
    zeros = product(torch.ones(5, 8), torch.ones(7, 8))
    assert zeros.shape == (5, 7) and not zeros.any()
    # `:x_waits`: the 4-bit launch's x_ready promise dropped, whatever its caller says
    assert speed._waiting_for_x(lambda *args, **kwargs: kwargs)("rows", x_ready=True) == {"x_ready": False}
