"""Unquantised modes: fp32, bf16 (autocast) and fp16 (autocast with a loss scaler)."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision

from vrft.precision.base import VrftPrecision
from vrft.precision.fsdp import FSDPCompatible


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
    fsdp_refusal = (
        "fp16 loss scaling under FSDP needs a scaler whose overflow checks span the shards, which vrft does "
        "not have; use precision=bf16 (or fp32), or trainer.strategy=ddp"
    )

    def __init__(self, load_dtype: str | torch.dtype = "fp16", init_scale: float = 2.0**16) -> None:
        super().__init__(
            load_dtype=load_dtype, compute_dtype="fp16", adapter_dtype="fp32", init_scale=init_scale
        )


class FSDPFp32Precision(FSDPCompatible, Fp32Precision, FSDPPrecision):
    """`Fp32Precision` in the form Lightning's FSDPStrategy accepts (`vrft.precision.fsdp`)."""


class FSDPBf16Precision(FSDPCompatible, Bf16Precision, FSDPPrecision):
    """`Bf16Precision` in the form Lightning's FSDPStrategy accepts (`vrft.precision.fsdp`)."""


Fp32Precision.fsdp_variant = FSDPFp32Precision
Bf16Precision.fsdp_variant = FSDPBf16Precision
