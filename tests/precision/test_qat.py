"""Quantisation-aware training: straight-through gradients, and the deployed merge matching the QAT forward."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_lora import converted, lora_model, randomize_adapters, relative_error, token_batch

from vrft.precision import Int4Precision, Int8Precision, merge_and_requantize
from vrft.precision.qat import QatForward, enable_qat
from vrft.precision.schemes import scheme_of


class Projection(torch.nn.Module):
    """One linear layer, so that the QAT layer's gradients can be compared with autograd's."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("plugin_class", [Int4Precision, Int8Precision])
def test_qat_gradients_equal_the_straight_through_estimator(plugin_class):
    torch.manual_seed(0)
    plugin = plugin_class(qat=True)
    model = get_peft_model(
        Projection().requires_grad_(False), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    )
    model = plugin.convert_module(model).to("cpu")
    randomize_adapters(model, std=0.05)
    layer = model.base_model.model.proj
    assert isinstance(layer, QatForward)
    x = torch.randn(3, 5, 128, requires_grad=True)
    weights = torch.randn(3, 5, 64)
    (model(x) * weights).sum().backward()
    qat_grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    # Autograd through W + (fake_quantize(W) - W).detach(): identity backward through the rounding.
    lora_a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    lora_b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    base = layer.base_layer
    scheme = scheme_of(base)
    weight = scheme.dequantize(base).float() + layer.scaling["default"] * (lora_b @ lora_a)
    rounded = weight + (scheme.fake_quantize(weight.detach()).float() - weight).detach()
    (torch.nn.functional.linear(x_ref, rounded, base.bias.float()) * weights).sum().backward()
    for got, expected in zip(qat_grads, [x_ref.grad, lora_a.grad, lora_b.grad], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("plugin_class", "tolerance"), [(Int4Precision, 1e-6), (Int8Precision, 0.01)])
def test_merged_requantized_model_matches_the_qat_forward(plugin_class, tolerance):
    # Int4: the deployed layer dequantises exactly the weight QAT rounded, so logits agree bit for bit.
    # Int8: bitsandbytes rescales the int8 rows in bf16 where QAT rescales in fp32 (0.3% measured).
    logits = {}
    for qat in (True, False):
        plugin = plugin_class(qat=qat)
        model = converted(plugin)
        randomize_adapters(model, std=0.05)
        model.train()  # int8 on CPU: the weight-only (dequantise + matmul) path, as QAT models it
        with torch.no_grad(), plugin.forward_context():
            logits[qat] = model(input_ids=token_batch()).logits
    deployed = merge_and_requantize(model)
    assert not any(isinstance(m, LoraLayer) for m in deployed.modules())
    deployed.train()
    with torch.no_grad(), plugin.forward_context():
        deployed_logits = deployed(input_ids=token_batch()).logits
    qat_gap = relative_error(logits[True], deployed_logits)
    plain_gap = relative_error(logits[False], deployed_logits)
    assert qat_gap <= tolerance
    assert qat_gap < plain_gap / 3  # without QAT the re-quantised merge drifts away from the trained model


def test_qat_reaches_every_adapter_and_keeps_state_dict_keys():
    plugin = Int4Precision(qat=True)
    plain = lora_model(plugin.load_dtype)
    keys = set(plain.state_dict())
    model = plugin.convert_module(plain).to("cpu")
    assert sum(isinstance(m, QatForward) for m in model.modules()) == 14
    # Keys change only by the quantisation statistics bitsandbytes adds to 4-bit weights.
    assert {k for k in model.state_dict() if "lora_" in k} == {k for k in keys if "lora_" in k}
    randomize_adapters(model)
    ids = token_batch()
    with plugin.forward_context():
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_disabled_adapter_is_the_quantised_base():
    # The GRPO reference policy runs with the adapter disabled: QAT must not touch that path.
    outputs = []
    for qat in (True, False):
        plugin = Int4Precision(qat=qat)
        model = converted(plugin)
        randomize_adapters(model)
        with torch.no_grad(), plugin.forward_context(), model.disable_adapter():
            outputs.append(model(input_ids=token_batch()).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_merge_and_requantize_leaves_the_trained_model_alone():
    plugin = Int8Precision(qat=True)
    model = converted(plugin)
    deployed = merge_and_requantize(model)
    assert sum(isinstance(m, QatForward) for m in model.modules()) == 14
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in deployed.modules()) == 14


def test_qat_refuses_lora_dropout():
    model = Int4Precision().convert_module(lora_model(torch.bfloat16, dropout=0.1))
    with pytest.raises(ValueError, match=r"dropout=0.1 .*set lora.dropout=0"):
        enable_qat(model)
