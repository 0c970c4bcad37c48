"""Shared fixtures: an isolated vrft cache per test session, CUDA skipping for `gpu` tests."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

_SESSION_CACHE: str | None = None


def pytest_configure(config):
    # One cache per session keeps tests independent of ~/.cache/vrft and of each other's runs.
    global _SESSION_CACHE
    if "VRFT_CACHE" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="vrft-test-cache-")
        os.environ["VRFT_CACHE"] = _SESSION_CACHE
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
