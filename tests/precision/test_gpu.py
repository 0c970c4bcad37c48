"""CUDA variants: quantisation on the move to the GPU, training there, the fp16 scaler in a GPU Trainer."""

from __future__ import annotations

import pytest
import torch
from test_trainer_integration import TinyPolicyModule
from tiny_lora import (
    LM_LINEARS_PER_LAYER,
    converted,
    lora_model,
    randomize_adapters,
    relative_error,
    token_batch,
)

from tests.support import bare_trainer
from vrft.precision import (
    Fp16Precision,
    Int4Precision,
    Int8Precision,
    MixedInt8Precision,
    merge_and_requantize,
)
from vrft.precision.accounting import bitsandbytes_class, weight_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QUANTISED = {
    "int4": (Int4Precision, "Linear4bit", 2 * LM_LINEARS_PER_LAYER),
    "int4-fp16": (lambda: Int4Precision(compute_dtype="fp16"), "Linear4bit", 2 * LM_LINEARS_PER_LAYER),
    "int8": (Int8Precision, "Linear8bitLt", 2 * LM_LINEARS_PER_LAYER),
    "mixed": (lambda: MixedInt8Precision(keep_last_layers=0), "Linear8bitLt", LM_LINEARS_PER_LAYER),
}


@pytest.mark.parametrize("mode", list(QUANTISED))
def test_weights_quantise_on_the_move_and_full_precision_never_reaches_the_gpu(mode):
    make, layer_type, count = QUANTISED[mode]
    plugin = make()
    model = plugin.convert_module(lora_model(plugin.load_dtype))
    largest_dense_layer = max(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if (bitsandbytes_class(m) or type(m)).__name__ == layer_type
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model.to("cuda")
    torch.cuda.synchronize()
    layers = [m for m in model.modules() if (bitsandbytes_class(m) or type(m)).__name__ == layer_type]
    assert len(layers) == count
    assert all(m.weight.device.type == "cuda" and m.weight.dtype in (torch.uint8, torch.int8) for m in layers)
    # At most one layer's dense weight is in flight while bitsandbytes quantises (plus allocator rounding).
    on_device = weight_bytes(model)
    assert torch.cuda.memory_allocated() - start <= on_device + 4 * 2**20
    assert torch.cuda.max_memory_allocated() - start <= on_device + 2 * largest_dense_layer + 4 * 2**20


@pytest.mark.parametrize("mode", list(QUANTISED))
def test_training_step_after_generate_on_cuda(mode):
    make, _, _ = QUANTISED[mode]
    plugin = make()
    model = converted(plugin, device="cuda")
    ids = token_batch().cuda()
    model.eval()
    with torch.no_grad(), plugin.forward_context():
        model.generate(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=2)
    model.train()
    with plugin.forward_context():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert torch.isfinite(loss)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in with_grad)


def test_int4_qat_matches_the_merged_requantized_model_on_cuda():
    plugin = Int4Precision(qat=True)
    model = converted(plugin, device="cuda")
    randomize_adapters(model)
    ids = token_batch().cuda()
    with torch.no_grad(), plugin.forward_context():
        qat_logits = model(input_ids=ids).logits
        deployed_logits = merge_and_requantize(model)(input_ids=ids).logits
    # The CUDA 4-bit kernels may order the matmul differently from the dense QAT matmul.
    assert relative_error(qat_logits, deployed_logits) < 0.01


@pytest.mark.parametrize(
    "make_plugin", [Int4Precision, Fp16Precision, lambda: Int4Precision(compute_dtype="fp16")]
)
def test_gpu_trainer_with_manual_optimization(make_plugin, tmp_path):
    plugin = make_plugin()
    module = TinyPolicyModule(clip_val=1.0, inject_inf_at=0 if plugin.scaler is not None else None)
    trainer = bare_trainer("gpu", 2, plugin, default_root_dir=tmp_path)
    trainer.fit(module)
    assert plugin.device_type == "cuda"
    expected_moves = [False, True] if plugin.scaler is not None else [True, True]
    assert [s["moved"] for s in module.steps] == expected_moves
    assert plugin.skipped_steps == (1 if plugin.scaler is not None else 0)
