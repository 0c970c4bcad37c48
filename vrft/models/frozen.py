"""Frozen sub-modules that never need autograd (the vision tower when only the language model is adapted)."""

from __future__ import annotations

import torch
from torch import nn


def run_without_autograd(module: nn.Module) -> nn.Module:
    """Make `module`'s forward run under `torch.no_grad()`; returns the module.

    With frozen weights and pixel inputs autograd records nothing anyway, but the no-grad mode also skips
    version counters and checkpointing bookkeeping, and guarantees that no activation of the frozen tower
    can be kept for a backward. The wrapper is set on the instance, so other instances keep their forward.
    """
    if getattr(module, "_vrft_no_grad", False):
        return module
    forward = module.forward
    module.forward = torch.no_grad()(forward)
    module._vrft_no_grad = True
    return module
