"""Floating-point vrft plugins in the form Lightning's `FSDPStrategy` accepts.

`FSDPStrategy` takes only an `FSDPPrecision` (its `precision_plugin` setter raises `TypeError` otherwise),
but `FSDPPrecision` brings its own dtype policy: `module_init_context` and `convert_input` cast to the
Lightning precision string's dtype, and `mixed_precision_config` hands FSDP a `MixedPrecision` that would
cast every flat parameter (adapters included) to bf16 and reduce gradients in bf16. vrft's plugin already
owns those decisions (frozen weights in `load_dtype`, adapters in `adapter_dtype`, autocast to
`compute_dtype`). A plugin's FSDP form is `class FSDPX(FSDPCompatible, X, FSDPPrecision)`: `FSDPPrecision`
last in the bases, so every hook the vrft plugin defines wins over it, and `FSDPCompatible` first, turning
FSDPPrecision's remaining hooks back into the base `Precision`'s. The result passes Lightning's check and
behaves as the vrft plugin.

Two things change under sharding, both here: FSDP is given no `MixedPrecision` (it stores and all-gathers
each parameter in the dtype the plugin cast it to, and reduce-scatters gradients in the adapters' dtype),
and whether a step's gradients are finite is decided over all ranks (each rank sees only its shard of the
gradients, and one rank skipping a step the others take would leave the shards of one adapter out of step).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig, OmegaConf


class FSDPCompatible:
    """Mixin, first in the bases of a vrft plugin's FSDP form (see the module docstring).

    `FSDPPrecision.__init__` is never called: the vrft plugin's sets every attribute the hooks read.
    """

    @property
    def mixed_precision_config(self) -> None:
        # The plugin has cast each parameter already and autocasts the forward; FSDP must not cast again.
        return None

    def module_init_context(self) -> AbstractContextManager:
        return Precision.module_init_context(self)

    def tensor_init_context(self) -> AbstractContextManager:
        return Precision.tensor_init_context(self)

    def convert_input(self, data: Any) -> Any:
        return Precision.convert_input(self, data)

    def convert_output(self, data: Any) -> Any:
        return Precision.convert_output(self, data)

    def weight_payload(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """The tensors another rank builds `param` from (rank 0 sends them before sharding,
        `vrft.runtime.weight_sync`), by key: here its data alone."""
        return {"": param.data}

    def rebuild_weight(
        self, module: torch.nn.Module, param: torch.nn.Parameter, payload: dict[str, torch.Tensor]
    ) -> torch.nn.Parameter:
        """The weight that replaces `module`'s meta `param`, built from rank 0's `weight_payload`."""
        return torch.nn.Parameter(payload[""], requires_grad=param.requires_grad)

    def step_finite(self, optimizer: Any, model, loss_finite: bool) -> bool:
        """Finite on every rank: each rank's loss and its shard of the gradients (one collective)."""
        local = super().step_finite(optimizer, model, loss_finite)
        # The strategy's own collective (precision imports nothing of vrft outside it, so not vrft.runtime).
        strategy = model.trainer.strategy
        bad = torch.tensor(float(not local), dtype=torch.float64, device=strategy.root_device)
        return float(strategy.reduce(bad, reduce_op="sum")) == 0


def fsdp_precision_config(precision_cfg: DictConfig) -> DictConfig:
    """`precision_cfg` with its `_target_` replaced by the plugin's FSDP form (same arguments).

    Raises `ValueError` naming the precision and the fix when the plugin has no FSDP form.
    """
    plugin = get_class(precision_cfg._target_)
    variant = getattr(plugin, "fsdp_variant", None)
    if variant is None:
        name = getattr(plugin, "name", plugin.__name__)
        reason = getattr(plugin, "fsdp_refusal", "it has no FSDP form; use precision=bf16 or precision=fp32")
        raise ValueError(f"trainer.strategy=fsdp with precision={name}: {reason}")
    sharded = OmegaConf.create(OmegaConf.to_container(precision_cfg, resolve=False))
    sharded._target_ = f"{variant.__module__}.{variant.__qualname__}"
    return sharded
