"""CUDA allocator settings and readings that must happen at the right moment of a run.

Every function here is a no-op without CUDA, so CPU runs and tests go through the same code.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

GIB = 2**30
# Expandable segments let one mapping grow instead of caching many fixed-size blocks: far less
# fragmentation when rollout (KV cache) and update (activations) alternate with different tensor sizes.
ALLOCATOR_SETTING = "expandable_segments:True"


def configure_allocator() -> None:
    """Turn on expandable segments unless the user configured the allocator; call before CUDA initialises.

    The allocator reads its settings once, at the first CUDA allocation; later changes are ignored.
    """
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if os.environ.get(variable):
            return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING


def apply_memory_cap(cap_gb: float | None, device: int = 0) -> float | None:
    """Cap this process's CUDA memory at `cap_gb` GiB (reserved bytes), so a bigger GPU behaves like a small one.

    Returns the fraction of the device that was set, or None when there is no cap or no CUDA.
    """
    if cap_gb is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gb <= 0:
        raise ValueError(f"memory_cap_gb={cap_gb} must be positive; use null for no cap")
    fraction = min(1.0, cap_gb * GIB / total)
    if fraction >= 1.0:
        log.warning("memory_cap_gb=%s is at least this GPU's %.1f GiB; running uncapped", cap_gb, total / GIB)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("CUDA memory capped at %.2f GiB (%.3f of %.1f GiB)", cap_gb, fraction, total / GIB)
    return fraction


def release_cached_memory(device: torch.device) -> None:
    """Give cached blocks back to the driver between phases, so the next phase's peak does not stack on them.

    Costs a device sync and a few ms; called once per rollout and per update, not per token.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_total_gb(device: int = 0) -> float | None:
    """Total memory of the CUDA device in GiB, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
