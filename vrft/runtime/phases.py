"""Which GRPO phase is running, and the peak memory each phase reached.

The GRPO step has three phases with different memory shapes: `rollout` (weights + KV cache),
`reference` (a no-grad forward for the KL term) and `update` (activations, gradients, optimizer state).
Tagging them gives two things: per-phase peaks for the logs and benchmarks, and an OOM message that names
the phase that ran out and the knob that shrinks it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vrft.runtime.cuda import GIB, release_cached_memory

PHASES = ("rollout", "reference", "update")


@dataclass
class PhasePeak:
    """Peak CUDA memory of one phase (GiB; 0 on CPU) and its wall time."""

    allocated_gb: float = 0.0
    reserved_gb: float = 0.0
    seconds: float = 0.0

    def merge(self, other: PhasePeak) -> None:
        self.allocated_gb = max(self.allocated_gb, other.allocated_gb)
        self.reserved_gb = max(self.reserved_gb, other.reserved_gb)
        self.seconds += other.seconds


class PhaseTracker:
    """Context manager factory: `with tracker("rollout", device): ...` tags the phase and records its peak.

    On an exception `current` keeps the failing phase's name (read by the OOM handler); on success it is
    reset. Cached blocks are released after each phase (`release=True`), so one phase's cache does not
    add to the next phase's peak.
    """

    def __init__(self, release: bool = True):
        self.release = release
        self.current: str | None = None
        self.peaks: dict[str, PhasePeak] = {}  # accumulated until `reset`

    @contextmanager
    def __call__(self, name: str, device: torch.device) -> Iterator[None]:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.current = name
        start = time.perf_counter()
        yield
        peak = PhasePeak(seconds=time.perf_counter() - start)
        if cuda:
            peak.allocated_gb = torch.cuda.max_memory_allocated(device) / GIB
            peak.reserved_gb = torch.cuda.max_memory_reserved(device) / GIB
        self.peaks.setdefault(name, PhasePeak()).merge(peak)
        self.current = None
        if self.release:
            release_cached_memory(device)

    def reset(self) -> None:
        self.peaks = {}

    def metrics(self) -> dict[str, float]:
        """`memory/<phase>_{allocated,reserved}_gb` and `time/<phase>_phase_s` for the logger."""
        metrics = {}
        for name, peak in self.peaks.items():
            metrics[f"memory/{name}_allocated_gb"] = peak.allocated_gb
            metrics[f"memory/{name}_reserved_gb"] = peak.reserved_gb
        return metrics
