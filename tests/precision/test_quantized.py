"""The bitsandbytes modes' options: schemes, keep rules, when quantisation happens, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_lora import LM_LINEARS_PER_LAYER, MERGER_LINEARS, VISION_LINEARS, base_model, converted, lora_model

from vrft.precision import Int4Precision, Int8Precision, MixedInt8Precision
from vrft.precision import backend as backend_module
from vrft.precision.accounting import bitsandbytes_class, weight_bytes
from vrft.precision.schemes import quantize_pending


def layer_class_name(module: torch.nn.Module) -> str:
    """The bitsandbytes class a layer is (vrft's subclasses count as their bitsandbytes base), else its own."""
    return (bitsandbytes_class(module) or type(module)).__name__


def layers_of(model, type_name: str) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if layer_class_name(m) == type_name}


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_int4_scheme_options_reach_every_layer(quant_type, double_quant):
    plugin = Int4Precision(quant_type=quant_type, double_quant=double_quant, compute_dtype="fp16")
    layers = layers_of(converted(plugin), "Linear4bit")
    assert len(layers) == 2 * LM_LINEARS_PER_LAYER
    for layer in layers.values():
        assert layer.weight.quant_type == quant_type
        assert layer.weight.compress_statistics is double_quant
        assert layer.weight.quant_state.nested is double_quant
        assert layer.compute_dtype == torch.float16
        assert layer.weight.dtype == torch.uint8  # packed: two 4-bit codes per byte


def test_int8_threshold_option():
    layers = layers_of(converted(Int8Precision(threshold=0.0)), "Linear8bitLt")
    assert len(layers) == 2 * LM_LINEARS_PER_LAYER
    assert all(layer.state.threshold == 0.0 and layer.weight.dtype == torch.int8 for layer in layers.values())


def test_weights_quantise_on_the_move_to_the_device_not_in_convert_module():
    plugin = Int4Precision()
    model = plugin.convert_module(lora_model(plugin.load_dtype))
    layers = layers_of(model, "Linear4bit")
    assert not any(layer.weight.bnb_quantized for layer in layers.values())
    assert all(layer.weight.dtype == torch.bfloat16 for layer in layers.values())
    model.to("cpu")
    assert all(layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8 for layer in layers.values())


def test_quantize_pending_and_connect_quantise_a_model_that_was_not_moved():
    plugin = Int8Precision()
    model = plugin.convert_module(lora_model(plugin.load_dtype))
    assert quantize_pending(model) == 2 * LM_LINEARS_PER_LAYER
    assert quantize_pending(model) == 0
    assert all(m.weight.dtype == torch.int8 for m in layers_of(model, "Linear8bitLt").values())
    plugin = Int4Precision()
    model = plugin.convert_module(lora_model(plugin.load_dtype))
    plugin.connect(model, [], [])
    assert all(m.weight.bnb_quantized for m in layers_of(model, "Linear4bit").values())
    assert plugin.device_type == "cpu"


def test_weight_bytes_of_a_4bit_layer_are_packed_codes_plus_block_statistics():
    plugin = Int4Precision(double_quant=False)
    model = converted(plugin)
    layer = model.get_submodule("base_model.model.model.language_model.layers.0.mlp.up_proj.base_layer")
    weights = 128 * 64
    # Half a byte per weight, one fp32 absmax per 64-weight block, 16 fp32 NF4 codes.
    assert weight_bytes(layer) == weights // 2 + weights // 64 * 4 + 16 * 4
    summary = plugin.summary(model)
    assert summary["total_params"] == Int4Precision().summary(lora_model())["total_params"]


def test_keep_rules_vision_merger_and_lm_head():
    plugin = Int4Precision(keep_vision=False, keep_merger=True, keep_lm_head=False)
    model = converted(plugin)
    summary = plugin.summary(model)
    quantised_vision = VISION_LINEARS - MERGER_LINEARS
    assert summary["quantized_layers"] == {"Linear4bit": 2 * LM_LINEARS_PER_LAYER + quantised_vision + 1}
    assert summary["high_precision_layers"] == {"merger (visual.merger)": MERGER_LINEARS}
    merger = model.get_base_model().model.visual.merger
    assert all(type(m) is torch.nn.Linear for m in merger.modules() if isinstance(m, torch.nn.Linear))
    # The tied embedding keeps its dense weight when lm_head is quantised.
    embed = model.get_base_model().model.language_model.embed_tokens
    assert embed.weight.dtype == torch.bfloat16 and embed.weight.shape == (151936, 64)


def test_mixed_keeps_first_last_and_named_layers_in_the_compute_dtype():
    plugin = MixedInt8Precision(
        keep_first_layers=1, keep_last_layers=1, keep_modules=["layers.*.mlp.down_proj"], compute_dtype="fp16"
    )
    model = converted(plugin, num_layers=4)
    summary = plugin.summary(model)
    # Layers 1 and 2 are quantised, except their down projections.
    assert summary["quantized_layers"] == {"Linear8bitLt": 2 * (LM_LINEARS_PER_LAYER - 1)}
    assert summary["high_precision_layers"] == {
        "vision tower (visual)": VISION_LINEARS,
        "lm_head": 1,
        "decoder layer 0": LM_LINEARS_PER_LAYER,
        "decoder layer 3": LM_LINEARS_PER_LAYER,
        "layers.*.mlp.down_proj": 2,
    }
    layers = model.get_base_model().model.language_model.layers
    for index in (0, 3):
        for name, module in layers[index].named_modules():
            if name.endswith("base_layer"):
                assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float16
    assert type(layers[1].mlp.down_proj.base_layer) is torch.nn.Linear
    assert layer_class_name(layers[1].mlp.up_proj.base_layer) == "Linear8bitLt"


def test_mixed_default_keeps_must_leave_something_to_quantise():
    with pytest.raises(ValueError, match=r"keep_first_layers=1 \+ keep_last_layers=1 keeps all 2 decoder"):
        MixedInt8Precision().convert_module(lora_model(torch.bfloat16))


def test_keep_modules_entry_matching_nothing_is_an_error():
    plugin = MixedInt8Precision(
        keep_last_layers=0, keep_modules=["visual.merger", "layers.0.mlp.no_such_proj"]
    )
    with pytest.raises(ValueError, match=r"keep_modules entry 'layers.0.mlp.no_such_proj' matches no module"):
        plugin.convert_module(lora_model(torch.bfloat16))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Int8Precision(compute_dtype="fp32"),
            r"compute_dtype='fp32' is not supported by precision=int8",
        ),
        (lambda: Int4Precision(compute_dtype="fp32"), r"compute_dtype.*='fp32' is not supported.*bf16, fp16"),
        (lambda: Int4Precision(quant_type="int3"), r"quant_type='int3'.*choose nf4"),
        (lambda: Int4Precision(adapter_dtype="fp16"), r"adapter_dtype='fp16'.*fp32, bf16"),
        (lambda: Int8Precision(threshold=-1.0), r"threshold=-1.0 must be >= 0"),
        (lambda: MixedInt8Precision(keep_modules="lm_head"), r"keep_modules='lm_head' must be a list"),
        (lambda: MixedInt8Precision(keep_first_layers=-1), r"keep_first_layers=-1 must be a whole number"),
    ],
)
def test_bad_options_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_missing_bitsandbytes_fails_at_construction_with_the_fix(monkeypatch):
    def broken(device):
        raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.setattr(backend_module, "_probe", broken)
    with pytest.raises(
        RuntimeError, match=r"precision=int4 needs bitsandbytes.* working on cpu.*choose precision=bf16"
    ):
        Int4Precision()


def test_bitsandbytes_failing_on_the_target_device_fails_in_convert_module(monkeypatch):
    plugin = Int4Precision()
    working = backend_module._probe

    def cpu_only(device="cpu"):
        if device != "cpu":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return working(device)

    monkeypatch.setattr(backend_module, "_probe", cpu_only)
    model = lora_model(torch.bfloat16)
    # Lightning hands convert_module the LightningModule, whose trainer's strategy knows the device.
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.raises(RuntimeError, match=r"precision=int4 needs bitsandbytes.* working on cuda"):
        plugin.convert_module(model)


def test_qat_without_adapters_on_quantised_layers_is_an_error():
    plugin = Int4Precision(qat=True)
    with pytest.raises(ValueError, match=r"precision.qat=true but no LoRA layer wraps a quantised layer"):
        plugin.convert_module(base_model(torch.bfloat16))
