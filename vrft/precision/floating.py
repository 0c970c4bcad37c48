"""Unquantised modes: fp32, bf16 (autocast) and fp16 (autocast with a loss scaler)."""

from __future__ import annotations

import torch

from vrft.precision.base import VrftPrecision


class Fp32Precision(VrftPrecision):
    """Everything in fp32, no autocast: the reference the other modes are measured against."""

    name = "fp32"

    def __init__(self) -> None:
        super().__init__(load_dtype="fp32", compute_dtype="fp32", adapter_dtype="fp32")


class Bf16Precision(VrftPrecision):
    """Frozen base in `load_dtype` (bf16 by default), matmuls autocast to bf16, adapters in `adapter_dtype`.

    Args:
        load_dtype: `bf16` halves the frozen weights' memory against `fp32`.
        adapter_dtype: `fp32` (default) keeps exact master weights; `bf16` saves little and can swallow
            small updates (bf16 has 8 mantissa bits).
    """

    name = "bf16"

    def __init__(
        self, load_dtype: str | torch.dtype = "bf16", adapter_dtype: str | torch.dtype = "fp32"
    ) -> None:
        super().__init__(load_dtype=load_dtype, compute_dtype="bf16", adapter_dtype=adapter_dtype)


class Fp16Precision(VrftPrecision):
    """Frozen base in `load_dtype` (fp16 by default), autocast to fp16, fp32 adapters, dynamic loss scaling.

    Steps whose gradients overflow are skipped and counted in `skipped_steps`.

    Args:
        load_dtype: `fp16` halves the frozen weights' memory against `fp32`.
        init_scale: the first loss scale; it halves on every overflow and doubles after 2000 clean steps.
    """

    name = "fp16"

    def __init__(self, load_dtype: str | torch.dtype = "fp16", init_scale: float = 2.0**16) -> None:
        super().__init__(
            load_dtype=load_dtype, compute_dtype="fp16", adapter_dtype="fp32", init_scale=init_scale
        )
