"""The base model loaded by rank 0 alone: the other ranks receive its weights one FSDP unit at a time.

Loading the checkpoint on every rank before sharding it would cost every rank the whole model in host memory
(a 72B base in bf16 is 144 GB; eight ranks on one node, 1.2 TB). Under `PolicyFSDPStrategy` rank 0 loads
and converts (casts, quantises) the model as an unsharded run does, while the other ranks build the same
modules on the meta device, holding no weight (`PolicyFSDPStrategy.loads_weights`). Right before FSDP wraps
a unit, `broadcast_unit` moves rank 0's weights of that unit to its device and broadcasts them, and the other
ranks build theirs from what they receive; FSDP then keeps each rank's shard and frees the rest, so a rank
other than 0 never holds more than one unit whole.

FSDP's own `sync_module_states` broadcasts the same way, but refuses tensors on the CPU (the gloo runs of the
tests) and knows only parameters and buffers, not the tensors a weight keeps beside itself (bitsandbytes'
4-bit statistics). Here the precision plugin says which tensors make a weight (`weight_payload`) and builds
a weight from them (`rebuild_weight`).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

# One entry of a unit's layout: (module path in the unit, "param" or "buffer", name, [(key, shape, dtype)]).
Entry = tuple[str, str, str, list[tuple[str, torch.Size, torch.dtype]]]


def unit_modules(unit: nn.Module) -> dict[str, nn.Module]:
    """The modules whose tensors the FSDP unit rooted at `unit` will own, by path: `unit` and its descendants,
    not those inside units wrapped already (the modules FSDP itself flattens)."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    queue = deque([("", unit)])
    while queue:
        path, module = queue.popleft()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found[path] = module
        for name, child in module.named_children():
            if not isinstance(child, FullyShardedDataParallel):
                queue.append((f"{path}.{name}" if path else name, child))
    return found


def broadcast_unit(unit: nn.Module, device: torch.device, plugin) -> None:
    """Every rank: the parameters and buffers of `unit`'s own modules become rank 0's, on `device`.

    A collective: every rank calls it for the same units in the same order. Rank 0 moves its weights to
    `device` (as FSDP moves a unit; a bitsandbytes weight moves its statistics with it) and sends them;
    the others replace their meta tensors with what they receive, tied weights staying tied.

    Args:
        unit: the module FSDP wraps next (the nested units below it wrapped already).
        device: this rank's device (the tensors are broadcast from there: NCCL sends CUDA tensors only).
        plugin: the precision plugin (`weight_payload`, `rebuild_weight`: how its weights are stored).
    """
    modules = unit_modules(unit)
    if dist.get_rank() == 0:
        layout, tensors = _send_layout(modules, device, plugin)
        dist.broadcast_object_list([layout], src=0)
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
        return
    message: list[list[Entry] | None] = [None]
    dist.broadcast_object_list(message, src=0)
    _receive(modules, message[0], device, plugin)


def _send_layout(
    modules: dict[str, nn.Module], device: torch.device, plugin
) -> tuple[list[Entry], list[torch.Tensor]]:
    layout: list[Entry] = []
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for path, module in modules.items():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied weight: the receivers tie theirs to the first copy
                continue
            seen.add(id(param))
            param.data = param.to(device)  # FSDP's own move (`param.data = param.to(device_id)`)
            payload = {key: value.to(device) for key, value in plugin.weight_payload(param).items()}
            layout.append((path, "param", name, [(key, t.shape, t.dtype) for key, t in payload.items()]))
            tensors += payload.values()
        for name, buffer in module.named_buffers(recurse=False):
            if id(buffer) in seen:
                continue
            seen.add(id(buffer))
            buffer.data = buffer.to(device)
            layout.append((path, "buffer", name, [("", buffer.shape, buffer.dtype)]))
            tensors.append(buffer)
    return layout, tensors


def _receive(modules: dict[str, nn.Module], layout: list[Entry], device: torch.device, plugin) -> None:
    rank = dist.get_rank()
    rebuilt: dict[int, torch.Tensor] = {}  # id of a meta tensor -> what replaced it
    for path, kind, name, keys in layout:
        module = modules.get(path)
        if module is None:
            raise RuntimeError(
                f"rank {rank} has no module '{path}' where rank 0 sent weights: the ranks built different "
                "models; give every rank the same model.name_or_path, lora and precision settings"
            )
        payload = {key: torch.empty(shape, dtype=dtype, device=device) for key, shape, dtype in keys}
        for tensor in payload.values():
            dist.broadcast(tensor, src=0)
        if kind == "buffer":
            rebuilt[id(module._buffers[name])] = module._buffers[name] = payload[""]
        else:
            param = module._parameters[name]
            rebuilt[id(param)] = module._parameters[name] = plugin.rebuild_weight(module, param, payload)
    for (
        path,
        module,
    ) in modules.items():  # tied weights and buffers: the same meta tensor elsewhere in the unit
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_meta:
                    if id(tensor) not in rebuilt:
                        raise RuntimeError(
                            f"rank {rank}: '{path}.{name}' received nothing from rank 0 (the ranks built "
                            "different models); give every rank the same model, lora and precision settings"
                        )
                    store[name] = rebuilt[id(tensor)]
