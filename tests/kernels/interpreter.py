"""Kernel logic checked on the CPU: a script run in a fresh process under the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def interpreted(script: str, path) -> list:
    """What `script` saved at `path` (its first argument), run under the Triton interpreter.

    A fresh process, because `TRITON_INTERPRET` is read when a kernel is defined; the repository root is
    importable there (scripts may import the tests' case builders).
    """
    numpy = pytest.importorskip("numpy")
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton 3.6's interpreter fails on numpy >= 2.4 (int() of a 1-element array)")
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path, weights_only=False)
