"""Precision plugins: how the policy's weights are stored (fp32, bf16, fp16, int8, int4, mixed) and computed.

Each plugin is a Lightning `Precision` built by Hydra from `conf/precision/<mode>.yaml` and passed to
`lightning.Trainer(plugins=[plugin])`. Model code never branches on the mode; it asks the plugin
(`load_dtype`, `compute_dtype`, `skipped_steps`, `summary`).
"""

from vrft.precision.base import VrftPrecision
from vrft.precision.floating import Bf16Precision, Fp16Precision, Fp32Precision
from vrft.precision.quantized import Int4Precision, Int8Precision, MixedInt8Precision, QuantizedPrecision


def merge_and_requantize(peft_model, inplace: bool = False):
    """Merge each LoRA adapter into its dequantised base and quantise again (see `vrft.precision.qat`)."""
    from vrft.precision.qat import merge_and_requantize as merge  # imports bitsandbytes

    return merge(peft_model, inplace=inplace)


__all__ = [
    "Bf16Precision",
    "Fp16Precision",
    "Fp32Precision",
    "Int4Precision",
    "Int8Precision",
    "MixedInt8Precision",
    "QuantizedPrecision",
    "VrftPrecision",
    "merge_and_requantize",
]
