"""Quantisation schemes: how a weight becomes a bitsandbytes layer, and the same rounding done in place.

Each scheme can

- build the bitsandbytes layer for a weight (`quantized_layer`); the weight is quantised when the layer is
  moved to a device (`.to(device)`, which Lightning does after `convert_module`), so the full-precision weight
  never has to sit on the GPU;
- `dequantize` such a layer back to a dense `[out, in]` weight;
- `fake_quantize` a dense weight: quantise and dequantise it with exactly the ops `quantized_layer` + `.to`
  use, which is what quantisation-aware training and `merge_and_requantize` need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from torch import Tensor

from vrft.precision.int8_linear import FrozenInt8Linear

QUANT_TYPES = ("nf4", "fp4")


def _frozen(tensor: Tensor | None) -> torch.nn.Parameter | None:
    return None if tensor is None else torch.nn.Parameter(tensor, requires_grad=False)


@dataclass(frozen=True)
class Int4Scheme:
    """bitsandbytes 4-bit blockwise quantisation (QLoRA): NF4 or FP4 codes, one absmax per `blocksize`.

    Args:
        quant_type: `nf4` (normal-float codes, best for normally distributed weights) or `fp4`.
        double_quant: also quantise the per-block absmax to 8 bits (about 0.37 bits/weight less).
        compute_dtype: dtype the weight is dequantised to for the matmul, `bf16` or `fp16`.
        blocksize: weights per absmax (bitsandbytes' default 64).
        quant_storage: dtype of the tensor the packed codes are stored in (the same bytes either way).
            uint8 by default; FSDP needs the dtype of the frozen weights around them, as it flattens one
            dtype per unit.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    quant_storage: torch.dtype = torch.uint8
    layer_type: ClassVar[type] = bnb.nn.Linear4bit

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"precision.quant_type={self.quant_type!r} is not a bitsandbytes 4-bit type; choose nf4 "
                "(default, best for normally distributed weights) or fp4"
            )

    def quantized_layer(self, weight: Tensor, bias: Tensor | None) -> bnb.nn.Linear4bit:
        """A `Linear4bit` holding `weight` `[out, in]`, quantised on its next `.to(device)`."""
        out_features, in_features = weight.shape
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=self.compute_dtype,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            device="meta",  # the real weight is assigned below; no throwaway allocation
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to(self.compute_dtype),
            requires_grad=False,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            module=layer,
        )
        layer.bias = _frozen(None if bias is None else bias.to(self.compute_dtype))
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place into a CPU-only layout on the
        # first no-grad eval forward (e.g. generation); the next training backward then fails on that
        # layout. Rollouts and updates alternate in GRPO, so the repacking must stay off.
        layer.support_avx512bf16_for_cpu = False
        return layer

    def fake_quantize(self, weight: Tensor) -> Tensor:
        """`weight` `[out, in]` rounded to this scheme's 4-bit grid, in `compute_dtype`."""
        packed, state = F.quantize_4bit(
            weight.to(self.compute_dtype).contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )
        return F.dequantize_4bit(packed, state)

    @staticmethod
    def dequantize(layer: bnb.nn.Linear4bit) -> Tensor:
        """The dense `[out, in]` weight a quantised `Linear4bit` computes with (its quant dtype)."""
        weight = layer.weight
        if not getattr(weight, "bnb_quantized", False):
            raise RuntimeError(
                "this Linear4bit is not quantised yet; move the model to its device first (model.to(device); "
                "Lightning does it right after convert_module)"
            )
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this Linear4bit was repacked into bitsandbytes' CPU inference layout; build it with the "
                "vrft precision plugin, which keeps support_avx512bf16_for_cpu off"
            )
        return F.dequantize_4bit(weight.data, weight.quant_state)

    @staticmethod
    def payload(param: torch.nn.Parameter) -> dict[str, Tensor] | None:
        """A quantised 4-bit weight as tensors (its packed codes under "", its statistics as bitsandbytes
        serialises them into a state dict), for `rebuild` on another rank; None for any other weight."""
        if not (isinstance(param, bnb.nn.Params4bit) and param.bnb_quantized):
            return None
        return {"": param.data, **param.quant_state.as_dict(packed=True)}

    @staticmethod
    def rebuild(layer: torch.nn.Module, param: torch.nn.Parameter, payload: dict[str, Tensor]):
        """The `Params4bit` of `layer` made from another rank's `payload`, where `param` (its placeholder on
        the meta device) is one; None for any other weight."""
        if not isinstance(param, bnb.nn.Params4bit):
            return None
        codes, statistics = payload[""], {key: value for key, value in payload.items() if key}
        # bitsandbytes' own constructor for pre-quantised weights (a quantised checkpoint's load).
        return bnb.nn.Params4bit.from_prequantized(
            codes, statistics, requires_grad=False, device=codes.device, module=layer
        )

    # 4-bit matmuls' temporaries are of few sizes: the allocator's usual rounding (see Int8Scheme).
    int8_matmuls: ClassVar[bool] = False

    def storage_bytes(self, out_features: int, in_features: int) -> int:
        """Device bytes of an `[out, in]` weight in this scheme: packed codes and scales (bias not included)."""
        count = out_features * in_features
        blocks = math.ceil(count / self.blocksize)
        # Double quantisation stores each block's absmax in 8 bits, plus fp32 absmax per 256 blocks,
        # a 256-entry fp32 code and an offset; without it the absmax stays fp32. Then the 16-entry code book.
        scales = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 if self.double_quant else blocks * 4
        return math.ceil(count / 2) + scales + 16 * 4

    @classmethod
    def of(cls, layer: bnb.nn.Linear4bit) -> Int4Scheme:
        """The scheme an existing `Linear4bit` was quantised with."""
        weight = layer.weight
        return cls(
            quant_type=weight.quant_type,
            double_quant=bool(weight.compress_statistics),
            compute_dtype=layer.compute_dtype or torch.bfloat16,
            blocksize=weight.blocksize,
        )


@dataclass(frozen=True)
class Int8Scheme:
    """bitsandbytes LLM.int8: one absmax scale per output row, int8 weights, fp16 outlier columns.

    Args:
        threshold: activation magnitude above which an input column is multiplied in fp16 instead of
            int8 (LLM.int8's outlier decomposition; 0 disables it).
    """

    threshold: float = 6.0
    layer_type: ClassVar[type] = bnb.nn.Linear8bitLt

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(
                f"precision.threshold={self.threshold} must be >= 0 (6.0 is LLM.int8's default; 0 turns "
                "outlier decomposition off)"
            )

    def quantized_layer(self, weight: Tensor, bias: Tensor | None) -> FrozenInt8Linear:
        """A `Linear8bitLt` holding `weight` `[out, in]`, quantised (rowwise, from fp16) on `.to(device)`; its
        backward keeps no copy of its input (`vrft.precision.int8_linear`)."""
        out_features, in_features = weight.shape
        layer = FrozenInt8Linear(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,  # frozen int8 weights: no fp16 copy is kept
            threshold=self.threshold,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.bias = _frozen(bias)
        return layer

    @staticmethod
    def fake_quantize(weight: Tensor) -> Tensor:
        """`weight` `[out, in]` rounded to int8 rows as `Int8Params` does (from fp16), in fp32."""
        rows, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return F.int8_vectorwise_dequant(rows, scales)

    @staticmethod
    def dequantize(layer: bnb.nn.Linear8bitLt) -> Tensor:
        """The dense `[out, in]` fp32 weight a quantised `Linear8bitLt` computes with."""
        # After the first forward bitsandbytes moves the int8 rows and scales from the weight to layer.state.
        rows = layer.state.CB if layer.state.CB is not None else layer.weight.CB
        scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        if rows is None or scales is None:
            raise RuntimeError(
                "this Linear8bitLt is not quantised yet; move the model to its device first (model.to(device); "
                "Lightning does it right after convert_module)"
            )
        return F.int8_vectorwise_dequant(rows, scales)

    # LLM.int8's many differently sized temporaries (input codes, outlier columns) fragment the allocator's
    # pool: the planner reserves more over the allocated peak (`Calibration.reserved_factor_int8`).
    int8_matmuls: ClassVar[bool] = True

    @staticmethod
    def storage_bytes(out_features: int, in_features: int) -> int:
        """Device bytes of an `[out, in]` weight in this scheme: int8 rows plus one fp32 scale per row."""
        return out_features * in_features + out_features * 4

    @classmethod
    def of(cls, layer: bnb.nn.Linear8bitLt) -> Int8Scheme:
        """The scheme an existing `Linear8bitLt` was built with."""
        return cls(threshold=float(layer.state.threshold))


def scheme_of(layer: torch.nn.Module) -> Int4Scheme | Int8Scheme | None:
    """The scheme of a bitsandbytes linear layer; None for anything else (a plain `nn.Linear`)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return Int4Scheme.of(layer)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return Int8Scheme.of(layer)
    return None


def quantize_pending(module: torch.nn.Module, device: torch.device | None = None) -> int:
    """Quantise bitsandbytes weights not quantised yet, leaving each where it was; returns how many.

    `module.to(device)` does this as a side effect; call it when a model was built or converted but not moved.
    A 4-bit weight is quantised on `device` (default: where it sits) and its codes brought back: the kernel of
    the device a run computes on is the one an unsharded run quantises with on its move there (bitsandbytes'
    CPU kernel is another implementation, whose rounding need not match), and a GPU quantises a large base
    far faster. Weights on the meta device (a rank that receives its weights from another,
    `vrft.runtime.weight_sync`) hold nothing to quantise.
    """
    count = 0
    for layer in module.modules():
        # Own parameters only: peft's LoRA wrappers expose their base layer's weight as `.weight` too.
        for name, param in list(layer.named_parameters(recurse=False)):
            if param.is_meta:
                continue
            if isinstance(param, bnb.nn.Params4bit) and not param.bnb_quantized:
                home = param.device
                # Params4bit quantises on any .to(device), in place, and moves its statistics with its codes.
                quantized = param.to(device or home)
                if quantized.device != home:
                    quantized = quantized.to(home)
            elif isinstance(param, bnb.nn.Int8Params) and param.dtype != torch.int8:
                # Int8Params quantises only on its way out of the CPU.
                quantized = param.to("cpu") if param.device.type == "cpu" else param.cpu().to(param.device)
            else:
                continue
            setattr(layer, name, quantized)
            count += 1
    return count
