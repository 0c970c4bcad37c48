"""A frozen LLM.int8 linear layer whose backward keeps no copy of its input.

Why not bitsandbytes' layer as it is: `bnb.matmul` (`MatMul8bitLt` on CUDA, `MatMul8bitFp` on the CPU) puts its
input on the autograd context as a plain attribute (`ctx.tensors` / `ctx.A`), for a weight gradient that a
frozen int8 base never asks for. Tensors kept that way are outside `save_for_backward`, so non-reentrant
gradient checkpointing cannot drop them: every int8 projection of every decoder layer kept its input until the
backward, ~2.7 bytes per input element (bench/README.md: ~4 GiB on 2B at micro-batch 4, 12 GiB planned on 7B,
which put `precision=int8` for 7B past a 24 GB card). The input gradient needs only the int8 rows and their
scales, which the layer holds anyway.

`FrozenInt8Linear.forward` runs bitsandbytes' own forward inside an autograd function (so the output is the
very tensor bitsandbytes computes, and bitsandbytes, seeing no input that needs a gradient, keeps nothing), and
the function's backward computes the input gradient exactly as `MatMul8bitLt.backward` does: the rows
dequantised to the input's dtype, one matmul. Where the weight or bias trains, bitsandbytes' path is taken.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import Tensor


class _FrozenInt8Matmul(torch.autograd.Function):
    """`layer(x)` with a backward for `x` only; nothing of `x` is kept for it."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: FrozenInt8Linear) -> Tensor:
        ctx.layer = layer  # the module, not an activation: its int8 rows are resident anyway
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return bnb.nn.Linear8bitLt.forward(layer, x)  # autograd is off here: bitsandbytes saves nothing

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        state = ctx.layer.state
        # As MatMul8bitLt.backward and MatMul8bitFp.backward compute the input gradient (bitsandbytes 0.50).
        weight = state.CB.to(ctx.input_dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        grad_output = grad_output.reshape(-1, grad_output.shape[-1]).to(ctx.input_dtype)
        return torch.matmul(grad_output, weight).view(ctx.input_shape), None


class FrozenInt8Linear(bnb.nn.Linear8bitLt):
    """`bnb.nn.Linear8bitLt` with frozen weights whose training forward keeps no input for the backward.

    Same storage, state and outputs as its base class (the scheme, peft's LoRA wrapper and the exporters see
    a `Linear8bitLt`); only what autograd keeps differs. Input `[..., in_features]`, output `[..., out_features]`.
    """

    def forward(self, x: Tensor) -> Tensor:
        trains_weights = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not (torch.is_grad_enabled() and x.requires_grad) or trains_weights:
            return super().forward(x)
        return _FrozenInt8Matmul.apply(x, self)
