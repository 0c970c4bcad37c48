"""The int8 layer's backward: bitsandbytes' input gradient, without keeping the input alive."""

from __future__ import annotations

import gc
import weakref

import bitsandbytes as bnb
import torch
from tiny_lora import converted

from vrft.precision import Int8Precision
from vrft.precision.int8_linear import FrozenInt8Linear


def int8_layer() -> FrozenInt8Linear:
    """A quantised q_proj of the tiny preset (it has a bias), in training mode as the update runs it."""
    model = converted(Int8Precision())
    layer = model.get_submodule("base_model.model.model.language_model.layers.0.self_attn.q_proj").base_layer
    assert isinstance(layer, FrozenInt8Linear) and layer.bias is not None
    return layer.train()


def test_output_and_input_gradient_are_bitsandbytes_own():
    layer = int8_layer()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, layer.in_features, generator=generator)
    grad = torch.randn(2, 5, layer.out_features, generator=generator)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(ours)
    expected = bnb.nn.Linear8bitLt.forward(layer, theirs)  # bitsandbytes' autograd function, as before
    assert out.grad_fn is not None and type(out.grad_fn) is not type(expected.grad_fn)
    out.backward(grad)
    expected.backward(grad)
    # The same operations on the same tensors (the rows dequantised to x's dtype, one matmul): equal bits.
    assert torch.equal(out, expected)
    assert torch.equal(ours.grad, theirs.grad)


def test_backward_keeps_no_copy_of_the_input():
    layer = int8_layer()
    x = torch.randn(3, layer.in_features, requires_grad=True)

    def kept_after_forward(forward) -> bool:
        hidden = x * 2.0  # what a decoder layer feeds a projection: no other node keeps it
        kept = weakref.ref(hidden)
        out = forward(hidden)
        del hidden
        gc.collect()
        alive = kept() is not None
        out.sum().backward()  # the graph still works without it
        return alive

    assert not kept_after_forward(layer)
    # bitsandbytes' own function keeps it on its autograd context, where checkpointing cannot drop it
    assert kept_after_forward(lambda hidden: bnb.nn.Linear8bitLt.forward(layer, hidden))


def test_frozen_paths_fall_back_to_bitsandbytes():
    layer = int8_layer()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert layer(x.requires_grad_()).grad_fn is None  # no graph at all in a no-grad forward
    assert layer(x.detach()).grad_fn is None  # an input without a gradient needs no backward
