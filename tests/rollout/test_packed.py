"""The `packed` rollout engine: where it runs, how `auto` and an explicit choice behave where it cannot."""

import logging
from types import SimpleNamespace

import pytest
import torch

import vrft.models.policy
import vrft.modules.policy_module
import vrft.train
from tests.rollout.test_engines import rows, teacher_forced_logprobs
from tests.support import train_config as config
from vrft.kernels import nf4_segments
from vrft.models.policy import LoraSpec, ModelSpec, attach_lora, load_base_model, load_processor_for
from vrft.planner.planning import resolve_auto
from vrft.rollout.engines import ROLLOUT_ENGINES, PackedEngine
from vrft.rollout.generate import generate_rollout
from vrft.rollout.packed import KernelLinear, SharedLoraInput, group_projections, packed_unavailable
from vrft.rollout.weights import LoraTerm, PackedLinear
from vrft.train import fit

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_packed_is_registered():
    assert ROLLOUT_ENGINES["packed"] is PackedEngine


def test_packed_needs_a_4bit_precision():
    assert "precision=bf16 stores no bitsandbytes 4-bit weights" in packed_unavailable("bf16", {})
    assert "precision=int8" in packed_unavailable("int8", {})


@needs_no_cuda
def test_auto_falls_back_to_dequant_without_cuda_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="vrft.planner.planning"):
        small = resolve_auto(config("+hw=rtx4080-16g", "model=qwen2vl-7b"))
    assert small.algorithm.rollout_engine == "dequant"
    message = next(r.getMessage() for r in caplog.records if "rollout_engine=auto picked" in r.getMessage())
    assert "not bf16_copy: its copy needs" in message
    assert "not packed: " in message and ("Triton is not installed" in message or "CUDA device" in message)


@needs_no_cuda
def test_explicit_packed_fails_before_loading_with_the_reason(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although rollout_engine=packed cannot run")

    for module in (vrft.models.policy, vrft.modules.policy_module):
        monkeypatch.setattr(module, "load_base_model", must_not_load)
    cfg = config("model=tiny", "precision=int4", "algorithm.rollout_engine=packed", f"run_dir={tmp_path}")
    with pytest.raises(
        ValueError, match="algorithm.rollout_engine=packed cannot run here: .*rollout_engine=dequant"
    ):
        fit(cfg)
    with pytest.raises(ValueError, match="algorithm.rollout_engine=packed cannot run here"):
        PackedEngine()


def test_a_misspelt_engine_fails_before_the_warm_start_and_the_load(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the warm start or the model load ran although rollout_engine names no engine")

    for module in (vrft.models.policy, vrft.modules.policy_module):
        monkeypatch.setattr(module, "load_base_model", must_not_run)
    monkeypatch.setattr(vrft.train, "apply_warm_start", must_not_run)
    cfg = config("model=tiny", "algorithm.rollout_engine=fast", f"run_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"^algorithm.rollout_engine='fast' is not one of \[.*'auto'\]"):
        fit(cfg)


def test_a_bad_nf4_mma_switch_fails_before_loading_naming_the_value(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although VRFT_NF4_MMA is neither 0 nor 1")

    for module in (vrft.models.policy, vrft.modules.policy_module):
        monkeypatch.setattr(module, "load_base_model", must_not_load)
    monkeypatch.setenv("VRFT_NF4_MMA", "off")
    for engine in ("auto", "packed"):  # auto would otherwise fall back past it without a word
        cfg = config(
            "model=tiny", "precision=int4", f"algorithm.rollout_engine={engine}", f"run_dir={tmp_path}"
        )
        with pytest.raises(ValueError, match="VRFT_NF4_MMA='off' is neither 0 nor 1: set VRFT_NF4_MMA=1"):
            fit(cfg)
    with pytest.raises(ValueError, match="VRFT_NF4_MMA='off'"):
        PackedEngine()


def test_planner_counts_no_weight_copy_and_no_decode_scratch_for_packed():
    from tests.planner.test_estimator import SHAPE, footprint, workload
    from vrft.planner.estimator import Calibration, estimate

    dequant = estimate(SHAPE, footprint(), workload(rollout_engine="dequant"), Calibration())
    packed = estimate(SHAPE, footprint(), workload(rollout_engine="packed"), Calibration())
    # dequant holds one bf16 matrix of scratch while decoding; packed no weights (its prefill's scratch is
    # in `prefill`), only the bf16 A matrices of the fused adapters (20_000 in `footprint`)
    assert dequant.components["rollout_engine"] == 8192 * 2
    assert packed.components["rollout_engine"] == 20_000 * 2
    assert packed.components["prefill"] == dequant.components["prefill"]


def kernel_layer(
    out_features: int, rank: int | None, in_features: int = 24, scale: float = 2.0, bias: bool = False
) -> KernelLinear:
    """A `KernelLinear` over a bitsandbytes 4-bit weight on the CPU (building it reads the weight's layout
    and addresses only; calling it needs CUDA)."""
    import bitsandbytes.functional as bnb_functional

    loras = (
        []
        if rank is None
        else [LoraTerm(torch.randn(rank, in_features), torch.randn(out_features, rank), scale)]
    )
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(
        weight, compress_statistics=True
    )  # as precision=int4 stores it
    base = SimpleNamespace(weight=SimpleNamespace(data=packed, quant_state=state), out_features=out_features)
    bias_values = torch.randn(out_features, dtype=torch.bfloat16) if bias else None
    return KernelLinear(PackedLinear(base, bias_values, loras, torch.bfloat16))


def test_shared_lora_input_is_each_projections_product_computed_once_per_input():
    torch.manual_seed(0)
    a_q, a_k, a_v = torch.randn(8, 24), torch.randn(4, 24), torch.randn(4, 24)
    group = SharedLoraInput([a_q, a_k, a_v])
    x = torch.randn(2, 3, 24)
    rows = x.reshape(-1, 24)
    product = group.product(x, rows)
    for a, columns in zip((a_q, a_k, a_v), group.columns, strict=True):
        # one [6, 16] product against three: the same fp32 sums over 24 inputs, possibly in another order
        torch.testing.assert_close(product[:, columns], rows @ a.T, rtol=1e-5, atol=1e-5)
    assert group.product(x, rows) is product  # the second and third projection reuse it
    other = x.clone()
    assert group.product(other, other.reshape(-1, 24)) is not product  # another input: multiplied again
    fresh = group.product(x, rows)
    x.mul_(2)  # the same tensor changed in place: multiplied again, not the stale product
    torch.testing.assert_close(group.product(x, rows), 2 * fresh)


def test_q_k_v_and_gate_up_share_one_x_a_product_when_all_have_an_adapter():
    layer = SimpleNamespace(
        q=kernel_layer(24, 8), k=kernel_layer(8, 8), v=kernel_layer(8, 8), o=kernel_layer(24, 8),
        gate=kernel_layer(40, 8), up=kernel_layer(40, 8), down=kernel_layer(24, 8, in_features=40),
    )  # fmt: skip
    group_projections(layer)
    assert layer.q.shared[0] is layer.k.shared[0] is layer.v.shared[0]
    assert layer.gate.shared[0] is layer.up.shared[0] is not layer.q.shared[0]
    assert [layer.q.shared[1], layer.k.shared[1], layer.v.shared[1]] == [
        slice(0, 8),
        slice(8, 16),
        slice(16, 24),
    ]
    # A is held once: by the group, none left in a projection's own group of one
    assert layer.q.shared[0].weight.shape == (24, 24) and layer.gate.shared[0].weight.shape == (16, 24)
    for name in ("o", "down"):  # inputs of their own: a group of one, over the projection's own A
        group, columns = getattr(layer, name).shared
        assert group.columns == [slice(0, 8)] and columns == slice(0, 8)
        assert group.weight is getattr(layer, name).loras[0].a  # fp32 outside autocast: A itself, no copy
    # a group with a projection without an adapter keeps one x A^T per projection
    partial = SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(8, None), v=kernel_layer(8, 8),
                              gate=kernel_layer(40, 8), up=kernel_layer(40, 4))  # fmt: skip
    group_projections(partial)
    assert partial.k.shared is None
    assert partial.q.shared[0] is not partial.v.shared[0] and partial.q.shared[0].columns == [slice(0, 8)]
    assert partial.gate.shared[1] == slice(0, 8) and partial.up.shared[1] == slice(8, 12)  # ranks may differ


def test_projections_of_one_input_share_one_kernel_launch_whose_table_points_at_their_weights():
    torch.manual_seed(0)
    layer = SimpleNamespace(
        q=kernel_layer(24, 8, bias=True), k=kernel_layer(8, 8, bias=True), v=kernel_layer(16, 4, bias=True),
        o=kernel_layer(24, 8), gate=kernel_layer(40, 8), up=kernel_layer(40, 8), down=kernel_layer(24, 8, 40),
    )  # fmt: skip
    group_projections(layer)
    kernels = layer.q.grouped[0]
    assert (
        layer.k.grouped[0] is kernels is layer.v.grouped[0] and layer.gate.grouped[0] is layer.up.grouped[0]
    )
    assert layer.o.grouped is None and layer.down.grouped is None  # inputs of their own
    assert [op.grouped[1] for op in (layer.q, layer.k, layer.v)] == [
        slice(0, 24),
        slice(24, 32),
        slice(32, 48),
    ]
    assert kernels.lora is layer.q.shared[0] and kernels.scale == 2.0
    fields = {name: index for index, name in enumerate(nf4_segments.SEGMENT_FIELDS)}
    for row, op in zip(kernels.segments.table.tolist(), (layer.q, layer.k, layer.v), strict=True):
        weight = op.base.weight
        assert row[fields["out_features"]] == op.out_features
        assert row[fields["packed"]] == weight.data.data_ptr()
        assert row[fields["absmax"]] == weight.quant_state.absmax.data_ptr()
        assert row[fields["absmax2"]] == weight.quant_state.state2.absmax.data_ptr()
        assert row[fields["bias"]] == op.bias.data_ptr() and row[fields["lora_b"]] == op.loras[0].b.data_ptr()
        # each weight reads its own columns of the shared x A^T, of its own rank
        assert (row[fields["lora_column"]], row[fields["lora_rank"]]) == (
            op.shared[1].start,
            op.loras[0].a.shape[0],
        )
    # what cannot share a launch stays separate: another adapter scale, some with a bias and some without
    for odd in (
        SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(8, 8, scale=0.5), v=kernel_layer(8, 8)),
        SimpleNamespace(q=kernel_layer(24, 8, bias=True), k=kernel_layer(8, 8), v=kernel_layer(8, 8)),
        SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(8, None), v=kernel_layer(8, 8)),
        SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(12, 8), v=kernel_layer(8, 8)),  # 12: unaligned
    ):
        odd.gate, odd.up = kernel_layer(40, 8), kernel_layer(40, 8)
        group_projections(odd)
        assert odd.q.grouped is None and odd.k.grouped is None and odd.v.grouped is None
    reason = nf4_segments.segments_unsupported([layer.q.segment(), layer.o.segment()])
    assert "some weights have a bias" in reason
    with pytest.raises(ValueError, match="cannot share one launch: out_features 12 is not a multiple of 8"):
        nf4_segments.segments([layer.o.segment(), kernel_layer(12, 8).segment()])


def test_the_gate_writes_silu_gate_times_up_in_the_gate_up_launch_where_switched_on(monkeypatch):
    # The routing on the CPU (the launch itself needs CUDA: its GPU tests are in tests/kernels): a gate
    # grouped with its up hands the decoder `silu(gate) * up` from one `matmul_4bit_silu` call a input, with
    # the group's shared x A^T; nothing where FOLD_SILU is off, for the up, or for other groups.
    from vrft.kernels import nf4_matmul
    from vrft.rollout import packed

    assert packed.FOLD_SILU is True  # on by default: its GPU tests passed (bench/rollout/results.md)
    torch.manual_seed(0)
    layer = SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(8, 8), v=kernel_layer(8, 8),
                            gate=kernel_layer(40, 8), up=kernel_layer(40, 8))  # fmt: skip
    group_projections(layer)
    x = torch.randn(2, 1, 24)
    rows = x.reshape(-1, 24)
    assert "not on a CUDA device" in nf4_matmul.silu_pairs_unsupported(rows, layer.gate.grouped[0].segments)
    assert "takes two weights of one shape" in nf4_matmul.silu_pairs_unsupported(
        rows, layer.q.grouped[0].segments
    )
    unequal = SimpleNamespace(q=kernel_layer(24, 8), k=kernel_layer(8, 8), v=kernel_layer(8, 8),
                              gate=kernel_layer(40, 8), up=kernel_layer(48, 8))  # fmt: skip
    group_projections(unequal)
    assert "takes two weights of one shape" in nf4_matmul.silu_pairs_unsupported(
        rows, unequal.gate.grouped[0].segments
    )

    def off_cuda(rows, group):  # the CPU's reason taken away, the others kept
        reason = nf4_matmul.silu_pairs_unsupported(rows, group)
        return None if reason == "x is not on a CUDA device" else reason

    calls = []

    def launch(rows, group, lora_in, scale, x_ready):
        calls.append((rows, group, lora_in, scale, x_ready))
        return torch.full((rows.shape[0], group.out_features[0]), float(len(calls)))

    monkeypatch.setattr(packed, "silu_pairs_unsupported", off_cuda)
    monkeypatch.setattr(packed, "matmul_4bit_silu", launch)
    monkeypatch.setattr(packed, "FOLD_SILU", False)
    assert layer.gate.silu_mul_with(layer.up, x) is None and not calls
    monkeypatch.setattr(packed, "FOLD_SILU", True)
    gated = layer.gate.silu_mul_with(layer.up, x)
    assert gated.shape == (2, 1, 40) and len(calls) == 1
    called_rows, group, lora_in, scale, x_ready = calls[0]
    assert torch.equal(called_rows, rows) and group is layer.gate.grouped[0].segments
    torch.testing.assert_close(lora_in, rows @ layer.gate.shared[0].weight.T)  # gate's and up's A together
    assert scale == 2.0 and x_ready
    again = layer.gate.silu_mul_with(layer.up, x)
    assert again.data_ptr() == gated.data_ptr() and len(calls) == 1  # once per input
    assert layer.up.silu_mul_with(layer.gate, x) is None  # the kernel's order: gate first
    assert layer.q.silu_mul_with(layer.k, x) is None  # three weights: not a gate/up pair
    assert layer.gate.silu_mul_with(layer.up, torch.randn(65, 24)) is None  # prefill rows: dequantised
    assert unequal.gate.silu_mul_with(unequal.up, x) is None


def int4_tiny_policy():
    """The tiny model in int4 on CUDA with a trained-looking LoRA adapter, and its processor."""
    from vrft.precision import Int4Precision

    spec = ModelSpec(name_or_path="tiny", max_pixels=12544)
    policy = attach_lora(
        load_base_model(spec, torch.bfloat16), LoraSpec(r=4, alpha=8), gradient_checkpointing=False
    )
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at zero)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    Int4Precision(compute_dtype="bf16", adapter_dtype="fp32").convert_module(policy)
    return policy.to("cuda").eval(), load_processor_for(spec)


GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10)


@pytest.mark.gpu
def test_packed_engine_greedy_tokens_match_generate_on_int4_weights():
    policy, processor = int4_tiny_policy()
    device, greedy = torch.device("cuda"), GREEDY
    engine = PackedEngine()
    layer = engine.read_weights(policy).layers[0]
    assert all(
        isinstance(getattr(layer, n), KernelLinear) for n in ("q", "k", "v", "o", "gate", "up", "down")
    )
    assert layer.q.shared[0] is layer.v.shared[0] and layer.gate.shared[0] is layer.up.shared[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = generate_rollout(policy, processor, rows(), "{problem}", 1, greedy, device)
        fast = generate_rollout(policy, processor, rows(), "{problem}", 1, greedy, device, engine=engine)
        expected = teacher_forced_logprobs(policy, processor, rows(), 1, fast.completion_ids, device)
    assert engine.last_stats["cuda_graph"] == 1.0
    # The first token comes from the prefill (dequantise-then-matmul, as generate): always equal. Later
    # tokens are compared through their log-probs, not token by token: on this near-uniform random model a
    # bf16 near-tie can flip one greedy choice and every token after it. Same bf16 weights, another fp32
    # summation order: the 7B bench measured at most 0.09 nats over 28 layers; 2 tiny layers stay far below.
    assert torch.equal(fast.completion_ids[:, 0], reference.completion_ids[:, 0])
    torch.testing.assert_close(engine.last_logprobs, expected.float(), atol=0.05, rtol=0)


@pytest.mark.gpu
def test_the_folded_silu_changes_no_token_and_no_log_prob(monkeypatch):
    # `silu(gate) * up` written by the gate/up launch (packed.FOLD_SILU) is bit for bit what the SiLU launch
    # computes from the two rounded outputs (tests/kernels/test_nf4_mma.py), so the rollout is the same:
    # the same greedy tokens and bit-identical log-probs; and the fold did run, once a layer and step.
    from vrft.rollout import packed

    policy, processor = int4_tiny_policy()
    device = torch.device("cuda")
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return packed_silu(*args, **kwargs)

    packed_silu = packed.matmul_4bit_silu
    monkeypatch.setattr(packed, "matmul_4bit_silu", counted)
    runs = {}
    for fold in (True, False):
        monkeypatch.setattr(packed, "FOLD_SILU", fold)
        calls.clear()
        engine = PackedEngine()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rollout = generate_rollout(
                policy, processor, rows(), "{problem}", 2, GREEDY, device, engine=engine
            )
        assert engine.last_stats["cuda_graph"] == 1.0
        assert bool(calls) == fold, len(calls)
        runs[fold] = (rollout.completion_ids, engine.last_logprobs)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


@pytest.mark.gpu
def test_programmatic_launch_changes_no_token_and_no_log_prob(monkeypatch):
    # vrft.kernels.launch_order only lets a kernel start before the one before it has drained; each waits
    # for its inputs, so the decode step computes the same numbers with the overlap and without it: the
    # same greedy tokens and bit-identical log-probs (the same kernels, the same summation order).
    from vrft.kernels import launch_order

    policy, processor = int4_tiny_policy()
    device = torch.device("cuda")
    # on an H100 or H200 the first run below overlaps its launches; older cards never do
    assert launch_order.programmatic(device) is (torch.cuda.get_device_capability(device)[0] >= 9)
    runs = {}
    for programmatic in (True, False):
        monkeypatch.setattr(launch_order, "PROGRAMMATIC", programmatic)
        engine = PackedEngine()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rollout = generate_rollout(
                policy, processor, rows(), "{problem}", 2, GREEDY, device, engine=engine
            )
        assert engine.last_stats["cuda_graph"] == 1.0  # the graph captured the launches as they were asked
        runs[programmatic] = (rollout.completion_ids, engine.last_logprobs)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])
