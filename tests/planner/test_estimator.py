"""The planner's arithmetic: hand-computed sizes, bytes of quantised layers, the tiny model's footprint."""

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from vrft.models.policy import LANGUAGE_MODEL_TARGETS, LoraSpec, ModelSpec, attach_lora, load_base_model
from vrft.planner.estimator import (
    Calibration,
    ModelShape,
    WeightFootprint,
    Workload,
    estimate,
    kv_cache_bytes,
    vision_patches,
)
from vrft.planner.footprint import _footprint, optimizer_state
from vrft.precision.accounting import weight_bytes
from vrft.precision.schemes import Int4Scheme, Int8Scheme


def _scheme_bytes(layer: torch.nn.Module) -> int:
    """What the planner is told a quantised layer's weight occupies: the precision plugin's answer."""
    from vrft.precision import Int4Precision

    return Int4Precision().layer_storage(layer)[0]


SHAPE = ModelShape(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    vocab=1000,
    vision_dim=32,
    vision_mlp=64,
    vision_depth=2,
)


def test_kv_cache_is_keys_and_values_of_every_layer():
    # 2 (K, V) x 2 layers x 3 sequences x 10 tokens x (2 heads x 16 dims) x 2 bytes
    assert kv_cache_bytes(SHAPE, sequences=3, tokens=10) == 2 * 2 * 3 * 10 * 32 * 2 == 7680


def test_nf4_layer_bytes_hand_computed():
    layer = Int4Scheme().quantized_layer(torch.randn(128, 64), None)
    # 8192 weights: 4096 packed bytes; 128 blocks of 64 -> 128 uint8 absmax + 1 fp32 second-level absmax
    # + a 256-entry fp32 code + fp32 offset (double quantisation) + the 16-entry fp32 NF4 code.
    assert _scheme_bytes(layer) == 4096 + 128 + 4 + 1024 + 4 + 64


@pytest.mark.parametrize("scheme", [Int4Scheme(), Int4Scheme(double_quant=False), Int8Scheme()], ids=str)
def test_layer_bytes_match_what_bitsandbytes_stores(scheme):
    layer = scheme.quantized_layer(torch.randn(96, 128), torch.zeros(96)).to("cpu")  # quantises on the move
    bias = layer.bias.numel() * layer.bias.element_size()
    assert _scheme_bytes(layer) + bias == weight_bytes(layer)


@pytest.mark.slow
def test_tiny_footprint_matches_the_quantised_model():
    from vrft.precision import Int4Precision

    precision_yaml = "_target_: vrft.precision.Int4Precision\n"
    planned, _, _, adapter_params, fused_a, adapter_bytes, _, _ = _footprint(
        "tiny", precision_yaml, LANGUAGE_MODEL_TARGETS, 4
    )
    model = attach_lora(load_base_model(ModelSpec("tiny"), torch.bfloat16), LoraSpec(r=4, alpha=8), False)
    Int4Precision().convert_module(model)
    model.to("cpu")
    lora = [p for p in model.parameters() if p.requires_grad]
    assert adapter_params == sum(p.numel() for p in lora)
    # the A matrices the packed engine copies: every language-model adapter sits on a 4-bit projection
    assert fused_a == sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert planned == weight_bytes(model) - adapter_params * adapter_bytes


def footprint(**changes) -> WeightFootprint:
    values = dict(
        weight_bytes=10 * 2**20,
        lm_linear_params=1_000_000,
        dequant_params=8192,
        adapter_params=50_000,
        fused_lora_a_params=20_000,
        adapter_bytes_per_param=4,
        optimizer_bytes_per_param=2.0,
        optimizer_paged=True,
    )
    return WeightFootprint(**{**values, **changes})


def workload(**changes) -> Workload:
    values = dict(
        group_size=4,
        rollout_batch_size=2,
        update_micro_batch_size=2,
        max_new_tokens=16,
        logprob_chunk_size=32,
        image_tokens=8,
        prompt_text_tokens=8,
        rollouts_per_step=1,
        rollout_engine="bf16_copy",
    )
    return Workload(**{**values, **changes})


def test_components_hand_computed():
    plan = estimate(SHAPE, footprint(), workload(), Calibration())
    parts = plan.components
    # 2 prompts' 16 tokens kept once for their G = 4 rows, and 8 rows' 16 new tokens each
    assert parts["kv_cache"] == kv_cache_bytes(SHAPE, 2, 16) + kv_cache_bytes(SHAPE, 8, 16)
    assert parts["rollout_engine"] == 1_000_000 * 2  # the bf16 copy of the language model
    assert parts["adapter"] == parts["gradients"] == 50_000 * 4
    assert parts["optimizer"] == 100_000 and plan.paged_gb == pytest.approx(100_000 / 2**30)
    assert parts["logprob_buffers"] == 32 * 1000 * Calibration().logits_backward_bytes  # min(chunk, 2 x 16)
    resident = 10 * 2**20 + 50_000 * 4  # paged optimizer state is outside the pool
    assert plan.phases["update"] > resident + parts["gradients"]
    assert plan.peak_reserved_gb == pytest.approx(
        plan.phases[plan.peak_phase] * Calibration().reserved_factor / 2**30 + Calibration().reserved_extra_gb
    )


def test_memory_grows_with_group_size_and_shrinks_with_checkpointing_and_engine():
    base = estimate(SHAPE, footprint(), workload(), Calibration())
    bigger = estimate(SHAPE, footprint(), workload(group_size=8), Calibration())
    # the rows' new tokens double; the prompts' cache is the same (kept once per prompt)
    generated = kv_cache_bytes(SHAPE, 8, 16)
    assert bigger.components["kv_cache"] == base.components["kv_cache"] + generated
    generate = estimate(SHAPE, footprint(), workload(rollout_engine="hf"), Calibration())
    assert generate.components["kv_cache"] > base.components["kv_cache"]  # G copies of each prompt's cache
    no_checkpointing = estimate(SHAPE, footprint(), workload(gradient_checkpointing=False), Calibration())
    assert no_checkpointing.components["activations"] > base.components["activations"]
    assert any("checkpointing is off" in note for note in no_checkpointing.notes)
    lean = estimate(SHAPE, footprint(), workload(rollout_engine="dequant"), Calibration())
    assert lean.components["rollout_engine"] == 8192 * 2 < base.components["rollout_engine"]


def test_int8_layers_keep_no_inputs_but_fragment_the_pool():
    # vrft.precision.int8_linear: an int8 projection's backward keeps nothing of its input past checkpointing
    cal = Calibration()
    base = estimate(SHAPE, footprint(), workload(), cal)
    int8 = estimate(SHAPE, footprint(int8_layers=2), workload(), cal)
    assert int8.components["activations"] == base.components["activations"]
    assert int8.phases == base.phases
    ratio = (int8.peak_reserved_gb - cal.reserved_extra_gb) / (base.peak_reserved_gb - cal.reserved_extra_gb)
    assert math.isclose(ratio, cal.reserved_factor_int8 / cal.reserved_factor)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("torch.optim.AdamW", (8.0, False)),
        ("bitsandbytes.optim.AdamW8bit", (2.0 + 8 / 256, False)),
        ("bitsandbytes.optim.PagedAdamW8bit", (2.0 + 8 / 256, True)),
    ],
)
def test_optimizer_state_by_class(target, expected):
    assert optimizer_state(OmegaConf.create({"_target_": target})) == expected


def test_rollout_phase_hand_computed():
    # resident + kept workspaces + engine + the prompts' pixels + the larger of prefill and decode, where a
    # static engine's decode holds the KV cache, one step's sampling buffers and its CUDA graph's outputs
    cal = Calibration()
    resident = 10 * 2**20 + 50_000 * 4 + cal.kept_workspaces_gb * 2**30
    pixels = 2 * vision_patches(8, SHAPE) * 3 * SHAPE.temporal_patch_size * SHAPE.patch_size**2 * 4
    plan = estimate(SHAPE, footprint(), workload(rollout_engine="packed"), cal)
    assert plan.components["kept_workspaces"] == cal.kept_workspaces_gb * 2**30  # shown in the report
    decode = plan.components["kv_cache"] + 8 * 1000 * 4 * 3 + 8 * 2 * cal.decode_graph_mlp * 128 * 2
    assert decode > plan.components["prefill"]
    assert plan.phases["rollout"] == pytest.approx(resident + 20_000 * 2 + pixels + decode)
    # bf16_copy: making the copy (one matrix's LoRA sum in fp32 beside its bf16 copy) where that is larger
    wide = dataclasses.replace(SHAPE, hidden=512, intermediate=4096)
    copy = estimate(wide, footprint(), workload(), cal)
    merging = (4 + 2) * 512 * 4096
    decode = copy.components["kv_cache"] + 8 * 1000 * 4 * 3 + 8 * 2 * cal.decode_graph_mlp * 4096 * 2
    pixels = 2 * vision_patches(8, wide) * 3 * wide.temporal_patch_size * wide.patch_size**2 * 4
    assert merging > pixels + max(copy.components["prefill"], decode)
    assert copy.phases["rollout"] == pytest.approx(resident + 1_000_000 * 2 + merging)
