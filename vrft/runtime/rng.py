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
def seeded_rng(seed: int):
    """Inside, torch (CPU and CUDA) draws from `seed`; the global random state is restored on exit."""
    with isolated_rng():
        torch.manual_seed(seed)
        yield
