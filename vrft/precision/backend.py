"""Checking, before training starts, that bitsandbytes can quantise at all."""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)


@functools.cache
def _probe(device: str = "cpu") -> ModuleType:
    import bitsandbytes
    import bitsandbytes.functional as F

    # Importing succeeds even when the native library for this device failed to load (bitsandbytes then
    # raises at the first quantised op); a 4-bit and an int8 round trip of 64 numbers prove both work.
    weight = torch.linspace(-1, 1, 64, device=device).reshape(1, 64)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    F.dequantize_4bit(packed, state)
    F.int8_vectorwise_quant(weight.half())
    return bitsandbytes


def require_bitsandbytes(mode: str, device: str = "cpu") -> ModuleType:
    """The `bitsandbytes` module, or a RuntimeError naming `mode` and the fix if it cannot quantise on `device`."""
    try:
        return _probe(device)
    except Exception as error:  # ImportError, OSError from the native library, backend errors
        raise RuntimeError(
            f"precision={mode} needs bitsandbytes>=0.50.2 working on {device}, which failed here "
            f"({type(error).__name__}: {error}); install a build for this machine with "
            "`pip install 'bitsandbytes>=0.50.2,<0.51'` or choose precision=bf16, fp16 or fp32"
        ) from error


class _DropBf16CastWarning(logging.Filter):
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" on every int8
    # matmul (hundreds per step). The cast is the documented LLM.int8 behaviour; the plugin says it once.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_warning() -> None:
    """Silence bitsandbytes' per-call int8 cast warning (idempotent)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropBf16CastWarning) for f in logger.filters):
        logger.addFilter(_DropBf16CastWarning())
