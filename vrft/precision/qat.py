"""Quantisation-aware LoRA training: the forward sees the merged adapter as it will be deployed.

Deploying a LoRA adapter trained on a quantised base usually means merging it into the weight and
quantising the merged weight again, which rounds the adapter's small delta away in part. With QAT every
adapted layer whose base is quantised computes

    W = fake_quantize(dequantize(base) + scaling * B @ A)        # [out, in]
    y = x @ W.T + bias

with the straight-through estimator: the rounding counts as identity in the backward, so the gradient
of `W` flows to A and B. `merge_and_requantize` builds the deployed model with the very same ops, so its
logits match the QAT forward up to matmul rounding.

Memory: the custom autograd function saves only the input and the adapter factors and rebuilds `W` in the
backward; saving `W` would keep a dense copy of every adapted weight alive through the step.
"""

from __future__ import annotations

import copy
import functools

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor

from vrft.precision.schemes import Int4Scheme, Int8Scheme, quantize_pending, scheme_of


def _single_adapter(layer: LoraLayer) -> str:
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        raise ValueError(
            f"quantisation-aware training merges exactly one LoRA adapter per layer, found active {active}; "
            "activate a single adapter (model.set_adapter(name))"
        )
    return active[0]


def _delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    # In fp32 whatever the adapter dtype, identically for the QAT forward and the deployed merge. Autocast
    # (active in the training forward) would round the product to bf16 and move weights across quantisation
    # bins, so that the QAT weight no longer equals the deployed one.
    with torch.autocast(lora_a.device.type, enabled=False):
        return scaling * (lora_b.float() @ lora_a.float())


def _dense(base: torch.nn.Module) -> Tensor:
    scheme = scheme_of(base)
    return (scheme.dequantize(base) if scheme is not None else base.weight).float()


def merged_weight(layer: LoraLayer) -> Tensor:
    """`[out, in]` fp32: the dequantised base weight plus the active adapter's `scaling * B @ A`."""
    adapter = _single_adapter(layer)
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return _dense(layer.get_base_layer()) + _delta(lora_a, lora_b, layer.scaling[adapter])


class _MergedFakeQuantLinear(torch.autograd.Function):
    """`y = x @ fake_quantize(dense + s * B @ A).T + bias`, straight-through to A and B.

    Shapes: x `[..., in]`, lora_a `[r, in]`, lora_b `[out, r]`, y `[..., out]`.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, base, scheme, dtype):
        ctx.input_dtype = x.dtype
        x = x.to(dtype)  # saved in the compute dtype, as an autocast linear would save it
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.scaling, ctx.base, ctx.scheme, ctx.dtype = scaling, base, scheme, dtype
        weight = _fake_quantized(base, lora_a, lora_b, scaling, scheme).to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        grad_output = grad_output.to(ctx.dtype)
        if ctx.needs_input_grad[0]:
            weight = _fake_quantized(ctx.base, lora_a, lora_b, ctx.scaling, ctx.scheme).to(ctx.dtype)
            grad_x = (grad_output @ weight).to(ctx.input_dtype)
        # dL/dW = g^T x (STE through the rounding). Contracting with the rank-r factors first gives the
        # adapter gradients without forming the [out, in] matrix: dA = s B^T g^T x, dB = s g^T x A^T.
        flat_g = grad_output.reshape(-1, grad_output.shape[-1]).float()  # [N, out]
        flat_x = x.reshape(-1, x.shape[-1]).float()  # [N, in]
        if ctx.needs_input_grad[1]:
            grad_a = (ctx.scaling * (flat_g @ lora_b.float()).T @ flat_x).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (ctx.scaling * flat_g.T @ (flat_x @ lora_a.float().T)).to(lora_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


def _fake_quantized(base, lora_a, lora_b, scaling, scheme) -> Tensor:
    # The merged weight rounded as deployment will round it; no graph: the backward is written out above.
    with torch.no_grad():
        return scheme.fake_quantize(_dense(base) + _delta(lora_a, lora_b, scaling))


class QatForward:
    """Mixin placed in front of a peft LoRA layer class: the forward of quantisation-aware training.

    Falls back to the layer's own forward when the adapter is disabled (the GRPO reference policy is the
    quantised base alone), merged, or not active here.
    """

    qat_scheme: Int4Scheme | Int8Scheme

    def _uses_merged_weight(self) -> bool:
        # Disabled, already merged or not active here: the layer's own (unmerged LoRA) forward applies.
        if self.disable_adapters or self.merged:
            return False
        return any(name in self.lora_A for name in self.active_adapters)

    def effective_weight(self) -> Tensor | None:
        """`[out, in]`: the weight this layer's forward multiplies by now (dequantised base plus adapter, rounded
        as deployment rounds it), or None when the forward is the plain LoRA layer's (adapter off).

        The static rollout engines ask for it (`vrft.rollout.weights.linear_op`): sampling from the base plus
        an unrounded adapter would sample another policy than the one QAT trains.
        """
        if not self._uses_merged_weight():
            return None
        adapter = _single_adapter(self)
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return _fake_quantized(self.get_base_layer(), lora_a, lora_b, self.scaling[adapter], self.qat_scheme)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x `[..., in]` -> `[..., out]` in x's dtype (as the wrapped bitsandbytes layer returns)."""
        if not self._uses_merged_weight() or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        adapter = _single_adapter(self)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        out = _MergedFakeQuantLinear.apply(
            x,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.scaling[adapter],
            self.get_base_layer(),
            self.qat_scheme,
            dtype,
        )
        return out.to(x.dtype)


@functools.cache
def _qat_class(cls: type) -> type:
    # One subclass per peft layer class, as torch.nn.utils.parametrize does: isinstance checks, peft's
    # adapter saving and state-dict keys all stay as they were.
    return type(f"Qat{cls.__name__}", (QatForward, cls), {"__module__": __name__})


def enable_qat(module: torch.nn.Module) -> int:
    """Switch every LoRA layer whose base is a bitsandbytes layer to the QAT forward; returns how many.

    Raises:
        ValueError: an adapter uses dropout or DoRA, neither of which exists in a merged weight.
    """
    count = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or isinstance(layer, QatForward):
            continue
        scheme = scheme_of(layer.get_base_layer())
        if scheme is None:
            continue  # a kept (unquantised) layer merges exactly: nothing to simulate
        for adapter in layer.lora_A:
            dropout = layer.lora_dropout[adapter]
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                raise ValueError(
                    f"precision.qat=true merges the adapter into the weight, which has no place for LoRA "
                    f"dropout={dropout.p} ({name}); set lora.dropout=0"
                )
            if layer.use_dora.get(adapter, False):
                raise ValueError(f"precision.qat=true does not support DoRA ({name}); turn use_dora off")
        layer.__class__ = _qat_class(type(layer))
        layer.qat_scheme = scheme
        count += 1
    return count


def merge_and_requantize(peft_model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The deployed model: each LoRA adapter merged into its dequantised base and quantised again.

    Layers with a bitsandbytes base are rebuilt with the same scheme (quantised on the base's device);
    layers with a dense base get the merged weight in the base's dtype. The result has no peft wrappers.

    Args:
        peft_model: a peft model (or any module holding peft LoRA layers) after quantisation.
        inplace: modify `peft_model` instead of a deep copy (saves memory, destroys the adapter).

    Returns:
        The base model (`peft_model.get_base_model()` when it has one) with merged layers.
    """
    model = peft_model if inplace else copy.deepcopy(peft_model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for name, layer in layers:
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear):  # bitsandbytes layers subclass nn.Linear
                raise ValueError(
                    f"merge_and_requantize merges LoRA on linear layers; {name} wraps a {type(base).__name__}"
                )
            weight = merged_weight(layer)
            bias = None if base.bias is None else base.bias.detach()
            scheme = scheme_of(base)
            if scheme is None:
                merged = torch.nn.Linear(base.in_features, base.out_features, bias=bias is not None)
                merged = merged.to(device=base.weight.device, dtype=base.weight.dtype).requires_grad_(False)
                merged.weight.copy_(weight)
                if bias is not None:
                    merged.bias.copy_(bias)
            else:
                merged = scheme.quantized_layer(weight, bias)
                quantize_pending(merged)
            merged.train(base.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, merged)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
