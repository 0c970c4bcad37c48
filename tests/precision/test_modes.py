"""Every precision mode on the tiny Qwen2-VL with LoRA, converted and moved as Lightning does it (CPU).

Logit tolerances are relative L2 errors against the fp32 model (fresh adapter, so the base alone):

- bf16 (8 significant bits, rounding 2^-9 = 0.2% per weight and activation): 2%;
- fp16 (11 bits, 2^-12): 0.5%;
- int8 (LLM.int8, one absmax per row: a step of absmax/127, about 0.6% RMS of a Gaussian row; the no-grad
  path also rounds the activations to int8): 3%;
- int4 (16 codes per 64-weight block: about 10% RMS for NF4 on Gaussian weights, FP4 somewhat worse): 20%
  for NF4, 25% for FP4.
Measured on this model: bf16 0.6%, fp16 0.07%, int8 1.1%, mixed 0.8%, NF4 11.5%, FP4 15%.
"""

from __future__ import annotations

import pytest
import torch
from tiny_lora import (
    LM_LINEARS_PER_LAYER,
    VISION_LINEARS,
    converted,
    lora_model,
    relative_error,
    token_batch,
)

from vrft.precision import (
    Bf16Precision,
    Fp16Precision,
    Fp32Precision,
    Int4Precision,
    Int8Precision,
    MixedInt8Precision,
)

# mode id -> (plugin factory, expected quantised layers, logit tolerance)
MODES = {
    "fp32": (Fp32Precision, {}, 1e-5),
    "bf16": (Bf16Precision, {}, 0.02),
    "fp16": (Fp16Precision, {}, 0.005),
    "int4": (Int4Precision, {"Linear4bit": 2 * LM_LINEARS_PER_LAYER}, 0.20),
    "int4-fp4-fp16": (
        lambda: Int4Precision(quant_type="fp4", double_quant=False, compute_dtype="fp16"),
        {"Linear4bit": 2 * LM_LINEARS_PER_LAYER},
        0.25,
    ),
    "int8": (Int8Precision, {"Linear8bitLt": 2 * LM_LINEARS_PER_LAYER}, 0.03),
    # The tiny model has 2 decoder layers: keeping the first leaves the second to quantise.
    "mixed": (lambda: MixedInt8Precision(keep_last_layers=0), {"Linear8bitLt": LM_LINEARS_PER_LAYER}, 0.03),
}


@pytest.fixture(scope="module", params=list(MODES))
def setup(request):
    factory, expected, tolerance = MODES[request.param]
    plugin = factory()
    return plugin, converted(plugin), expected, tolerance


@pytest.fixture(scope="module")
def fp32_logits():
    with torch.no_grad():
        return lora_model(torch.float32).eval()(input_ids=token_batch()).logits


def train_loss(plugin, model) -> torch.Tensor:
    ids = token_batch()
    model.train()
    with plugin.forward_context():
        return model(input_ids=ids, labels=ids).loss


def test_quantised_layer_types_and_untouched_vision_tower_and_lm_head(setup):
    plugin, model, expected, _ = setup
    assert plugin.summary(model)["quantized_layers"] == expected
    vision = [m for n, m in model.named_modules() if ".visual." in n and isinstance(m, torch.nn.Linear)]
    assert len(vision) == VISION_LINEARS
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == plugin.load_dtype for m in vision)
    lm_head = model.get_base_model().lm_head
    assert type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == plugin.load_dtype
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)


def test_only_lora_parameters_receive_gradients(setup):
    plugin, model, _, _ = setup
    train_loss(plugin, model).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_training_step_after_generate(setup):
    # bitsandbytes repacks 4-bit weights for CPU inference on a no-grad forward unless the plugin stops it;
    # the repacked layout breaks the next training backward.
    plugin, model, _, _ = setup
    ids = token_batch(length=4)
    model.eval()
    with torch.no_grad(), plugin.forward_context():
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False
        )
    assert generated.shape == (2, 6)
    loss = train_loss(plugin, model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    for layer in model.modules():
        if type(layer).__name__ == "Linear4bit":
            assert layer.support_avx512bf16_for_cpu is False
            assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_logits_within_tolerance_of_fp32(setup, fp32_logits):
    plugin, model, _, tolerance = setup
    model.eval()
    with torch.no_grad(), plugin.forward_context():
        logits = model(input_ids=token_batch()).logits
    assert relative_error(logits, fp32_logits) < tolerance


def test_summary_counts_parameters_and_bytes(setup):
    plugin, model, expected, _ = setup
    summary = plugin.summary(model)
    assert summary["mode"] == plugin.name
    # LoRA r=8 on every projection of both layers: 8 * (in + out) each.
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert summary["trainable_params"] == 2 * sum(8 * (i + o) for i, o in shapes)
    dense = VISION_LINEARS + 1 + 2 * LM_LINEARS_PER_LAYER - sum(expected.values())  # + 1: lm_head
    assert sum(summary["high_precision_layers"].values()) == dense
    reference = Fp32Precision().summary(lora_model(torch.float32))
    assert summary["total_params"] == reference["total_params"]
    if plugin.name == "fp32":
        assert summary["weight_bytes"] == reference["weight_bytes"]
    else:
        assert summary["weight_bytes"] < reference["weight_bytes"]
