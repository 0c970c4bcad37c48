"""bench/memory/speed.py's ablation suffixes: the decode step with one part taken out, while an engine
generates and only then (bench/rollout/results.md, "The decode step with parts taken out")."""

import torch

from tests.support import bench_module


def test_the_ablations_take_their_part_out_for_a_generate_and_put_it_back(monkeypatch):
    speed = bench_module("bench/memory/speed.py")
    from vrft.kernels import decode_fusions
    from vrft.rollout import packed, stages

    def current():
        return stages.decode_attention, decode_fusions.silu_mul, packed.lora_input, packed.matmul_4bit

    before = current()
    # on `bf16_copy`, which builds without CUDA (`packed` refuses a machine without Triton); suffixes stack
    engine = speed.engine_for("bf16_copy:free_lora_input:x_waits:free_attention:free_silu")
    inner = engine
    while hasattr(inner, "_engine"):
        inner = inner._engine
    assert type(inner).__name__ == "Bf16CopyEngine"
    seen = []
    monkeypatch.setattr(inner, "generate", lambda *a, **k: seen.append(current()))
    engine.generate()
    attention, silu_mul, product, matmul = seen[0]
    assert all(during is not original for during, original in zip(seen[0], before, strict=True))
    assert current() == before
    q, gate = torch.randn(2, 4), torch.randn(3, 5)
    assert attention(q, "keys", "values") is q and silu_mul(gate, None) is gate
    zeros = product(torch.ones(5, 8), torch.ones(7, 8))
    assert zeros.shape == (5, 7) and not zeros.any()
    # `:x_waits`: the 4-bit launch's x_ready promise dropped, whatever its caller says
    assert speed._waiting_for_x(lambda *args, **kwargs: kwargs)("rows", x_ready=True) == {"x_ready": False}
