"""Random state that a side computation (a held-out check, a cached warm start) must leave as it found it."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def isolated_rng():
    """Restore the Python, NumPy and torch (CPU and CUDA) random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def prompt_seed(base_seed: int, epoch: int, row_indices: list[int]) -> int:
    """A seed of its own for the rollout of these rows in this epoch, whichever rank generates them.

    A rollout seeded from the global RNG would depend on the rank and on how many batches that rank drew
    before; keyed by the rows, the same prompts sample the same completions on 1 rank or N, and again on
    resume. `torch.Generator` seeds are 64-bit; the key is mixed by `hash` of an int tuple (not salted).
    """
    return hash((int(base_seed), int(epoch), *map(int, row_indices))) % 2**63


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | None = None):
    """Inside, torch's CPU generator and that of `device` (a CUDA device, if given) draw from `seed`; both are
    restored on exit.

    Only this rank's device is forked: saving another GPU's random state would open a CUDA context on it
    from every rank of a multi-GPU run.
    """
    cuda = device is not None and device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
