"""Where vrft keeps things: the cache of built artefacts, the keys that name them, the config folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

KEY_LENGTH = 12  # hex digits: enough to tell configs apart, short enough to read in a folder name


def cache_root() -> Path:
    """Where built artefacts (tiny model, synthetic data, warm starts) are cached: `$VRFT_CACHE`, else
    `~/.cache/vrft`. A leading `~` is expanded (a quoted `VRFT_CACHE='~/x'` reaches Python unexpanded), and an
    empty `VRFT_CACHE=` counts as unset rather than as the current folder."""
    root = Path(os.environ.get("VRFT_CACHE") or Path.home() / ".cache" / "vrft").expanduser()
    check_folder(root, "the cache folder (VRFT_CACHE)", "set VRFT_CACHE=<a folder>")
    return root


def check_folder(folder: Path, what: str, fix: str) -> None:
    """`folder` is a folder, or can be made one: neither it nor the nearest part of its path that exists is a
    file. mkdir would otherwise fail with errno's words and no key; `what` and `fix` name them."""
    folder = Path(folder).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under '{existing}', which is a file"
        raise ValueError(f"{what} '{folder}' {where}; {fix}")


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing that becomes `path` only once the block ends without an error: it is made in
    the same folder (so the rename is atomic on every POSIX filesystem), fsynced, renamed over `path`, and the
    folder is fsynced (the rename is durable only once the folder entry is on disk). An error, a stop or a full
    disk mid-write leaves `path` as it was and removes the partial file. The one home of this for checkpoints
    (`AtomicCheckpointIO`) and for the JSON a later command reads back."""
    path = Path(path)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only; a plain open follows the umask
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, never a part of it (`atomic_file`): for the held-out
    results, run summary, evaluation settings and predictions, which a later command reads back."""
    with atomic_file(path) as file:
        file.write(text)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


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


# Folder names stay well under the 255 bytes most file systems allow, with room for the files inside.
MAX_JOB_FOLDER_CHARS = 120


def job_folder(overrides: str, number: int) -> str:
    """A multirun job's folder name (`${job_folder:${hydra.job.override_dirname},${hydra.job.num}}`).

    Its overrides (`optimizer.lr=0.001,seed=1`) when they make a short name; else the job number, the
    start of the overrides and a hash of all of them, so that long sweeps still get distinct, readable names.
    """
    name = overrides.replace("/", "_") or f"job-{number}"
    if len(name) <= MAX_JOB_FOLDER_CHARS:
        return name
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:8]
    return f"{number}-{name[: MAX_JOB_FOLDER_CHARS - 20]}-{digest}"
