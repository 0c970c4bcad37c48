"""Where vrft keeps things: the cache of built artefacts, the keys that name them, the config folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

KEY_LENGTH = 12  # hex digits: enough to tell configs apart, short enough to read in a folder name


def cache_root() -> Path:
    """Where built artefacts (tiny model, synthetic data, warm starts) are cached: `$VRFT_CACHE`, else
    `~/.cache/vrft`."""
    return Path(os.environ.get("VRFT_CACHE", Path.home() / ".cache" / "vrft"))


def cache_key(text: str) -> str:
    """A short, stable name for what `text` describes (a serialised config): equal text, equal key."""
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def config_dir() -> Path:
    """The Hydra config folder: the checkout's top-level `conf/` when running from source (or an editable
    install), else the copy a wheel installs as `vrft/_conf` (pyproject maps `conf/` there)."""
    package = Path(__file__).resolve().parent
    source = package.parent / "conf"
    if (source / "train.yaml").is_file():
        return source
    return package / "_conf"
