"""The precision plugin every vrft mode derives from: dtypes, autocast, and the fp16 loss scaler.

A plugin decides three dtypes:

- `load_dtype`: the dtype the frozen base weights are loaded in (before any quantisation);
- `compute_dtype`: the dtype matmuls run in (autocast when it is not fp32);
- `adapter_dtype`: the dtype of the trainable LoRA weights (fp32 by default: they are the master weights
  the optimizer updates, and the loss scaler cannot unscale fp16 gradients).

When the compute dtype is fp16, a `torch.amp.GradScaler` scales the loss before backward, unscales the
gradients once before clipping or stepping, and skips (never applies) steps whose gradients overflowed,
counting them in `skipped_steps`. In every precision, a step whose loss or gradients are not finite is
skipped the same way (one NaN gradient, clipped, would turn every adapter weight into NaN), counted in
`skipped_steps`, and flagged in `last_step_nonfinite` for the module to stop a run that keeps diverging. This works under manual optimization: `manual_backward` goes through
`pre_backward`, `LightningOptimizer.step` through `optimizer_step`, `LightningModule.clip_gradients`
through `clip_gradients`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from vrft.precision.accounting import (
    is_quantized_param,
    parameter_counts,
    quantized_layer_counts,
    weight_bytes,
)
from vrft.precision.selection import quantizable_linears

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(value: str | torch.dtype, option: str, allowed: tuple[str, ...]) -> torch.dtype:
    """`value` ("bf16", "bfloat16" or a torch.dtype) as a torch.dtype; raises if it is not in `allowed`.

    Args:
        value: the configured dtype.
        option: the config key, named in the error (e.g. "precision.compute_dtype").
        allowed: short names that this option accepts, e.g. ("bf16", "fp16").
    """
    dtype = value if isinstance(value, torch.dtype) else DTYPES.get(str(value).lower())
    if dtype is None or SHORT_NAMES.get(dtype) not in allowed:
        raise ValueError(f"{option}={value!r} is not supported here; choose one of {', '.join(allowed)}")
    return dtype


def gradients_finite(optimizer: Any) -> bool:
    """Whether every gradient of `optimizer`'s parameters is finite (one host sync)."""
    grads = [
        p.grad
        for group in _raw_optimizer(optimizer).param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _raw_optimizer(optimizer: Any) -> Optimizer:
    # `LightningModule.clip_gradients` receives the LightningOptimizer wrapper, `optimizer_step` the wrapped
    # optimizer; the scaler keys its per-optimizer state by object id, so both must name the same object.
    return getattr(optimizer, "optimizer", optimizer)


class VrftPrecision(Precision):
    """Base precision plugin of vrft: parameter dtypes, autocast and (for fp16 compute) loss scaling.

    Args:
        load_dtype: dtype of the frozen base weights as loaded (`fp32`, `bf16`, `fp16`).
        compute_dtype: dtype of the forward's matmuls; not fp32 means autocast to it.
        adapter_dtype: dtype of the trainable (LoRA) weights, `fp32` or `bf16`.
        init_scale: first loss scale of the fp16 GradScaler (only used when compute_dtype is fp16).
    """

    name: str = "vrft"
    # Base weights packed by bitsandbytes (int8 / int4 codes in uint8 tensors): DDP replicates them as they
    # are, but FSDP and DeepSpeed would have to flatten and shard them (issue 14), which vrft does not do yet.
    quantized_base: bool = False
    # The plugin's form for `trainer.strategy=fsdp` (an FSDPPrecision, `vrft.precision.fsdp`), or None and
    # the reason, named in the error that refuses the run before loading.
    fsdp_variant: type | None = None
    fsdp_refusal: str = "it has no FSDP form; use precision=bf16 or precision=fp32, or trainer.strategy=ddp"

    def __init__(
        self,
        load_dtype: str | torch.dtype = "fp32",
        compute_dtype: str | torch.dtype = "fp32",
        adapter_dtype: str | torch.dtype = "fp32",
        init_scale: float = 2.0**16,
    ) -> None:
        self.load_dtype = parse_dtype(load_dtype, "precision.load_dtype", ("fp32", "bf16", "fp16"))
        self.compute_dtype = parse_dtype(compute_dtype, "precision.compute_dtype", ("fp32", "bf16", "fp16"))
        # fp16 adapters would need unscaling of fp16 gradients, which GradScaler refuses.
        self.adapter_dtype = parse_dtype(adapter_dtype, "precision.adapter_dtype", ("fp32", "bf16"))
        # The autocast device; `connect` corrects it to where Lightning put the model.
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[
            self.compute_dtype
        ]
        self.scaler: torch.amp.GradScaler | None = None
        if self.compute_dtype == torch.float16:
            if init_scale <= 0:
                raise ValueError(f"precision.init_scale={init_scale} must be positive; the default is 65536")
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=init_scale)
        self.skipped_steps = 0
        self.last_step_nonfinite = False  # the last optimizer step saw a non-finite loss or gradient
        self._loss_finite = True  # every loss backpropagated since the last optimizer step was finite
        self._unscaled: set[int] = set()  # ids of optimizers unscaled since the last scaler update

    # ------------------------------------------------------------------------------------ module
    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Cast frozen weights to `load_dtype` and trainable (adapter) weights to `adapter_dtype`, on CPU."""
        self.cast_parameters(module, frozen_dtype=self.load_dtype)
        return module

    def cast_parameters(self, module: torch.nn.Module, frozen_dtype: torch.dtype) -> None:
        """Cast floating parameters in place: trainable ones to `adapter_dtype`, frozen ones to `frozen_dtype`.

        Quantised (bitsandbytes) weights and buffers are left alone: rotary `inv_freq` buffers must stay fp32.
        Assigning `.data` keeps each Parameter object, so tied weights stay tied.
        """
        for param in module.parameters():
            if is_quantized_param(param) or not param.is_floating_point():
                continue
            dtype = self.adapter_dtype if param.requires_grad else frozen_dtype
            if param.dtype != dtype:
                param.data = param.data.to(dtype)

    @override
    def connect(
        self, model: torch.nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[torch.nn.Module, list[Optimizer], list[Any]]:
        # Called by the strategy after the model reached its device: autocast where the weights are.
        param = next(model.parameters(), None)
        if param is not None:
            self.device_type = param.device.type
        return super().connect(model, optimizers, lr_schedulers)

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Autocast to `compute_dtype` on the model's device (nothing for fp32)."""
        if self.compute_dtype == torch.float32:
            yield
            return
        # cache_enabled=False: the frozen weights are cast once per use anyway, and a cache would keep a
        # compute-dtype copy of every weight alive for the whole step.
        with torch.autocast(self.device_type, dtype=self.compute_dtype, cache_enabled=False):
            yield

    # ---------------------------------------------------------------------------- loss scaling
    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        self._loss_finite &= bool(torch.isfinite(tensor.detach()).all())
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        return super().pre_backward(tensor, module)

    def unscale_gradients(self, optimizer: Any) -> None:
        """Divide the gradients of `optimizer` by the loss scale, once per step (no-op without a scaler)."""
        optimizer = _raw_optimizer(optimizer)
        if self.scaler is None or id(optimizer) in self._unscaled:
            return
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            return  # nothing to unscale; GradScaler would record no inf check and refuse to step
        self.scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # Under manual optimization this runs between manual_backward and optimizer.step: the gradients
        # are still scaled, and clipping scaled gradients would clip at `clip_val * scale`.
        if clip_val > 0:
            self.unscale_gradients(optimizer)
        super().clip_gradients(_raw_optimizer(optimizer), clip_val, gradient_clip_algorithm)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return None  # training_step returned None: Lightning skipped backward, nothing to step
        self.unscale_gradients(optimizer)
        # The module's on_before_optimizer_step hook (grad norms, clipping) sees unscaled gradients.
        self._after_closure(model, optimizer)
        loss_finite, self._loss_finite = self._loss_finite, True
        if self.scaler is not None and loss_finite:
            return self._scaled_step(optimizer, closure_result, **kwargs)
        self._unscaled.clear()
        self.last_step_nonfinite = not self.step_finite(optimizer, model, loss_finite)
        if self.last_step_nonfinite:
            self.skipped_steps += 1
            log.warning(
                "non-finite %s: optimizer step skipped, weights unchanged (%d skipped so far)",
                "gradient" if loss_finite else "loss",
                self.skipped_steps,
            )
            if self.scaler is not None:
                self.scaler.update(self.scaler.get_scale())  # forget this step's inf checks, keep the scale
            return closure_result
        return _raw_optimizer(optimizer).step(**kwargs)

    def step_finite(self, optimizer: Any, model: pl.LightningModule, loss_finite: bool) -> bool:
        """Whether this step may be applied: its losses were finite and so are the gradients (one host sync)."""
        return loss_finite and gradients_finite(optimizer)

    def _scaled_step(self, optimizer: Optimizer, closure_result: Any, **kwargs: Any) -> Any:
        """fp16: step through the GradScaler, which skips (and lowers the scale on) overflowed gradients."""
        self.last_step_nonfinite = False  # an fp16 overflow is the scaler's routine, not a diverging run
        if id(_raw_optimizer(optimizer)) not in self._unscaled:
            return closure_result  # no parameter has a gradient: nothing to step
        scale_before = self.scaler.get_scale()
        # GradScaler.step skips optimizer.step when unscale_ found an inf/nan gradient...
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        self._unscaled.clear()
        # ...and update() lowers the scale exactly when it did: that is the skipped step.
        if self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1
            log.info(
                "fp16 gradients overflowed: optimizer step skipped, loss scale %g -> %g (%d skipped so far)",
                scale_before,
                self.scaler.get_scale(),
                self.skipped_steps,
            )
            if self.scaler.get_scale() < 1.0:
                log.warning(
                    "the fp16 loss scale fell below 1 (%g): the model overflows fp16 in most steps; "
                    "use precision=bf16 (or compute_dtype=bf16) on hardware that supports it",
                    self.scaler.get_scale(),
                )
        return step_output

    @override
    def state_dict(self) -> dict[str, Any]:
        """The skipped-step count, and the loss scaler's state when there is one."""
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    # -------------------------------------------------------------------------------- storage
    def layer_storage(self, layer: torch.nn.Module) -> tuple[int, bool] | None:
        """How this plugin stores a converted linear layer: `(weight bytes on the device, whether it multiplies
        in LLM.int8)`, or None for a layer it leaves dense (the planner counts those as ordinary parameters).
        The floating modes quantise nothing."""
        return None

    # -------------------------------------------------------------------------------- summary
    def summary(self, module: torch.nn.Module) -> dict[str, Any]:
        """What `run_summary.json` records about precision: mode, dtypes, layer types, memory, parameters.

        `weight_bytes` is the sum of parameter and buffer bytes (packed 4-bit storage and quantisation
        statistics included, tied weights once); it is what the weights occupy on the device.
        """
        trainable, total = parameter_counts(module)
        return {
            "mode": self.name,
            "load_dtype": SHORT_NAMES[self.load_dtype],
            "compute_dtype": SHORT_NAMES[self.compute_dtype],
            "adapter_dtype": SHORT_NAMES[self.adapter_dtype],
            "quantized_layers": quantized_layer_counts(module),
            # Frozen linear layers left dense (the quantised modes break this down by keep rule).
            "high_precision_layers": {"all": len(quantizable_linears(module))},
            "weight_bytes": weight_bytes(module),
            "trainable_params": trainable,
            "total_params": total,
            "loss_scale": self.scaler.get_scale() if self.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
        }
