"""Quantised modes: the frozen base's linear layers in bitsandbytes 4-bit (int4) or LLM.int8 (int8, mixed).

`convert_module` runs on CPU, on the whole LightningModule, after the LoRA adapter was attached:

1. it plans which linear layers to convert (`selection.plan_quantization`): never adapters (`lora_A`,
   `lora_B`, anything trainable), never the kept modules (vision tower and `lm_head` by default);
2. it replaces each by a bitsandbytes layer that holds the weight in the compute dtype, unquantised;
3. it casts adapters to `adapter_dtype` and every other frozen weight to the compute dtype;
4. with `qat=true` it switches the adapted quantised layers to the quantisation-aware forward.

The weights are quantised when Lightning then moves the module to its device (bitsandbytes quantises
`Params4bit` / `Int8Params` inside `.to(device)`, one layer at a time), so a full-precision copy of the
model never reaches the GPU; on CPU the same `.to("cpu")` quantises. `connect` checks afterwards that
nothing was left unquantised (a strategy that skipped the move) and quantises it in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch.optim import Optimizer
from typing_extensions import override

from vrft.precision.backend import quiet_int8_cast_warning, require_bitsandbytes
from vrft.precision.base import VrftPrecision, parse_dtype
from vrft.precision.fsdp import FSDPCompatible
from vrft.precision.selection import KeepRules, is_lora_layer, plan_quantization, quantizable_linears

log = logging.getLogger(__name__)


def _target_device(module: torch.nn.Module) -> torch.device | None:
    # Lightning hands convert_module the LightningModule, whose trainer knows where the model will go.
    trainer = getattr(module, "_trainer", None)
    return getattr(getattr(trainer, "strategy", None), "root_device", None)


class QuantizedPrecision(VrftPrecision):
    """Base of the bitsandbytes modes; see the module docstring for what `convert_module` does.

    Args:
        compute_dtype: `bf16` or `fp16` (fp16 adds dynamic loss scaling).
        adapter_dtype: dtype of the LoRA weights, `fp32` (default) or `bf16`.
        keep_vision / keep_merger / keep_lm_head / keep_first_layers / keep_last_layers / keep_modules:
            what stays unquantised, see `selection.KeepRules`.
        qat: quantisation-aware training of the merged adapter (see `vrft.precision.qat`).
    """

    quantized_base = True
    fsdp_refusal = (
        "sharding bitsandbytes' int8 base is not supported (FSDP would flatten its int8 codes and their "
        "row statistics); use precision=int4 or precision=bf16 under trainer.strategy=fsdp, or "
        "trainer.strategy=ddp, which keeps the quantised base whole on every rank"
    )

    def __init__(
        self,
        compute_dtype: str | torch.dtype = "bf16",
        adapter_dtype: str | torch.dtype = "fp32",
        keep_vision: bool = True,
        keep_merger: bool = True,
        keep_lm_head: bool = True,
        keep_first_layers: int = 0,
        keep_last_layers: int = 0,
        keep_modules: Sequence[str] = (),
        qat: bool = False,
    ) -> None:
        require_bitsandbytes(self.name)  # fail before any model is loaded
        compute = parse_dtype(
            compute_dtype, f"precision.compute_dtype (precision={self.name})", ("bf16", "fp16")
        )
        # The base is loaded in the compute dtype: quantisation starts from it, kept layers compute in it.
        super().__init__(load_dtype=compute, compute_dtype=compute, adapter_dtype=adapter_dtype)
        if isinstance(keep_modules, str):
            raise ValueError(
                f"precision.keep_modules={keep_modules!r} must be a list of module paths, e.g. ['{keep_modules}']"
            )
        self.keep = KeepRules(
            vision=keep_vision,
            merger=keep_merger,
            lm_head=keep_lm_head,
            first_layers=keep_first_layers,
            last_layers=keep_last_layers,
            modules=tuple(keep_modules),
        )
        self.qat = bool(qat)
        self.scheme = self.build_scheme()

    def build_scheme(self):
        """The quantisation scheme of this mode (`schemes.Int4Scheme` / `Int8Scheme`)."""
        raise NotImplementedError

    @override
    def layer_storage(self, layer: torch.nn.Module) -> tuple[int, bool] | None:
        from vrft.precision.schemes import scheme_of  # imports bitsandbytes, checked in __init__

        scheme = scheme_of(layer)
        if scheme is None:
            return None
        return scheme.storage_bytes(layer.out_features, layer.in_features), scheme.int8_matmuls

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        device = _target_device(module)
        if device is not None and device.type != "cpu":
            # The CUDA library is only exercised by the move; fail here with the fix rather than there.
            require_bitsandbytes(self.name, device.type)
        # Trainable plain linears (not LoRA's) are what full fine-tuning trains: no mode can quantise them.
        training = [
            name
            for name, child in module.named_modules()
            if isinstance(child, torch.nn.Linear) and child.weight.requires_grad and not is_lora_layer(name)
        ]
        if training:
            raise ValueError(
                f"precision={self.name} has {len(training)} linear layers whose own weights train (e.g. "
                f"{training[0]}, lora.full=true); quantised weights cannot train: use precision=bf16, fp16 or "
                "fp32 for full fine-tuning, or LoRA adapters (lora.full=false) on the quantised base"
            )
        plan = plan_quantization(module, self.keep, self.name)
        linears = quantizable_linears(module)
        with torch.no_grad():
            for name in plan.quantize:
                linear = linears[name]
                layer = self.scheme.quantized_layer(linear.weight.data, linear.bias)
                layer.train(linear.training)
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent), child, layer)
            self.cast_parameters(module, frozen_dtype=self.compute_dtype)
        for layer in module.modules():
            # Also 4-bit layers this plugin did not build (a checkpoint loaded pre-quantised): see schemes.py
            # for why the CPU inference repacking must stay off.
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False
        kept = {label: len(names) for label, names in plan.kept.items() if names}
        log.info(
            "precision=%s: %d linear layers -> %s (quantised on the move to the device); kept in %s: %s",
            self.name,
            len(plan.quantize),
            self.scheme.layer_type.__name__,
            self.compute_dtype,
            kept or "none",
        )
        if self.qat:
            from vrft.precision.qat import enable_qat

            adapted = enable_qat(module)
            if adapted == 0:
                raise ValueError(
                    f"precision.qat=true but no LoRA layer wraps a quantised layer (precision={self.name}); "
                    "attach the adapter before convert_module or set precision.qat=false"
                )
            log.info(
                "precision.qat: %d adapted layers train against their merged, re-quantised weight", adapted
            )
        return module

    @override
    def connect(
        self, model: torch.nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[torch.nn.Module, list[Optimizer], list[Any]]:
        from vrft.precision.schemes import quantize_pending  # imports bitsandbytes, checked in __init__

        pending = quantize_pending(model)
        if pending:
            log.warning(
                "precision=%s: quantised %d layers the device move had left alone", self.name, pending
            )
        return super().connect(model, optimizers, lr_schedulers)

    @override
    def summary(self, module: torch.nn.Module) -> dict[str, Any]:
        summary = super().summary(module)
        patterns = self.keep.patterns([name for name, _ in module.named_modules()])
        kept: dict[str, int] = {}
        for name in quantizable_linears(module):  # the frozen linear layers still dense
            label = next((label for label, pattern in patterns.items() if pattern.search(name)), "other")
            kept[label] = kept.get(label, 0) + 1
        summary["high_precision_layers"] = kept
        summary["qat"] = self.qat
        summary["scheme"] = {k: v for k, v in vars(self.scheme).items() if not isinstance(v, torch.dtype)}
        return summary


class Int4Precision(QuantizedPrecision):
    """bitsandbytes 4-bit (QLoRA) base weights: about 0.55 bytes per weight with double quantisation.

    Args:
        quant_type: `nf4` (default) or `fp4`.
        double_quant: quantise the per-block scales too (saves about 0.37 bits per weight).
        **kwargs: the options of `QuantizedPrecision`.
    """

    name = "int4"

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True, **kwargs: Any) -> None:
        self.quant_type = quant_type
        self.double_quant = double_quant
        super().__init__(**kwargs)

    @override
    def build_scheme(self):
        from vrft.precision.schemes import Int4Scheme  # imports bitsandbytes, checked in __init__

        return Int4Scheme(
            quant_type=self.quant_type, double_quant=self.double_quant, compute_dtype=self.compute_dtype
        )


class Int8Precision(QuantizedPrecision):
    """bitsandbytes LLM.int8 base weights: one byte per weight plus one fp32 scale per row.

    LLM.int8 multiplies in fp16; with `compute_dtype=bf16` bitsandbytes casts each int8 matmul's input to
    fp16 and the result back, the rest of the model computing in bf16.

    Args:
        threshold: outlier threshold of LLM.int8 (6.0; 0 quantises every input column).
        **kwargs: the options of `QuantizedPrecision`.
    """

    name = "int8"

    def __init__(self, threshold: float = 6.0, **kwargs: Any) -> None:
        self.threshold = threshold
        compute = kwargs.get("compute_dtype", "bf16")
        if str(compute).lower() in ("fp32", "float32", "torch.float32"):
            raise ValueError(
                f"precision.compute_dtype={compute!r} is not supported by precision={self.name}: LLM.int8 "
                "multiplies in fp16, so fp32 would only add casts; choose bf16 (default) or fp16"
            )
        super().__init__(**kwargs)
        quiet_int8_cast_warning()
        if self.compute_dtype == torch.bfloat16:
            log.info(
                "precision=%s: int8 matmuls take fp16 inputs; bf16 activations are cast per call", self.name
            )

    @override
    def build_scheme(self):
        from vrft.precision.schemes import Int8Scheme  # imports bitsandbytes, checked in __init__

        return Int8Scheme(threshold=self.threshold)


class MixedInt8Precision(Int8Precision):
    """LLM.int8 for the bulk of the language model; sensitive layers stay in the compute dtype.

    By default the vision tower, merger, embeddings, `lm_head` and the first and last decoder layers are
    kept (embeddings are never quantised in any mode). Same options as `Int8Precision`.
    """

    name = "mixed"

    def __init__(self, keep_first_layers: int = 1, keep_last_layers: int = 1, **kwargs: Any) -> None:
        super().__init__(keep_first_layers=keep_first_layers, keep_last_layers=keep_last_layers, **kwargs)


class FSDPInt4Precision(FSDPCompatible, Int4Precision, FSDPPrecision):
    """`Int4Precision` in the form Lightning's FSDPStrategy accepts (`vrft.precision.fsdp`).

    FSDP flattens each unit's frozen weights into one tensor of one dtype and shards it, which bitsandbytes'
    packed codes survive when they are stored in that dtype (`quant_storage` = the compute dtype, the dtype
    of the norms and kept layers beside them) and quantised before the flattening: `convert_module`
    quantises at once, one layer at a time on the run's device (the codes an unsharded run gets), and leaves
    the codes on the CPU for FSDP to move unit by unit. Each `Linear4bit` keeps its
    quantisation statistics on the module (`module=` in `Params4bit`), and bitsandbytes reattaches them to
    the gathered weight in its forward (`fix_4bit_weight_quant_state_from_module`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.qat:
            raise ValueError(
                "precision.qat=true under trainer.strategy=fsdp is not supported (QAT re-quantises each merged "
                "weight, which FSDP holds only as a shard); set precision.qat=false or trainer.strategy=ddp"
            )

    @override
    def build_scheme(self):
        from vrft.precision.schemes import Int4Scheme  # imports bitsandbytes, checked in __init__

        return Int4Scheme(
            quant_type=self.quant_type,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            quant_storage=self.compute_dtype,
        )

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from vrft.precision.schemes import quantize_pending  # imports bitsandbytes, checked in __init__

        module = super().convert_module(module)
        quantize_pending(module, _target_device(module))
        return module

    @override
    def weight_payload(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        from vrft.precision.schemes import Int4Scheme  # imports bitsandbytes, checked in __init__

        return Int4Scheme.payload(param) or super().weight_payload(param)

    @override
    def rebuild_weight(
        self, module: torch.nn.Module, param: torch.nn.Parameter, payload: dict[str, torch.Tensor]
    ) -> torch.nn.Parameter:
        from vrft.precision.schemes import Int4Scheme  # imports bitsandbytes, checked in __init__

        rebuilt = Int4Scheme.rebuild(module, param, payload)
        return rebuilt if rebuilt is not None else super().rebuild_weight(module, param, payload)


Int4Precision.fsdp_variant = FSDPInt4Precision
