"""Checkpoints that survive kills and full disks: written beside their destination, fsynced, renamed.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder: when the run folder is on another filesystem the final move is a copy, and a kill
during it leaves a truncated `last.ckpt` (measured: 3 of 3 kills). Here the temporary file sits in the
destination folder, so the rename is atomic on every POSIX filesystem and the previous checkpoint stays
whole until the new one is complete. A failed write (disk full, read-only folder) removes the partial file
and stops the run with one line (`CheckpointWriteError`) instead of a traceback.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from vrft.paths import atomic_file

ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or set hydra.run.dir to a folder with room",
    errno.EDQUOT: "the disk quota is exhausted: free space there or set hydra.run.dir elsewhere",
    errno.EROFS: "the filesystem is read-only: set hydra.run.dir to a writable folder",
    errno.EACCES: "no permission to write there: set hydra.run.dir to a writable folder",
}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file, the reason and the fix.

    An `OSError` the CLI shows as one line (exit 2): the environment, not vrft, is what needs fixing.
    """

    def __init__(self, path: Path, error: OSError):
        reason = ADVICE.get(error.errno, f"set hydra.run.dir to a folder that can hold it ({error})")
        super().__init__(
            error.errno,
            f"could not write checkpoint '{path}': {error.strerror or error}; {reason}. The checkpoints "
            "written before are complete and kept; resume from the newest with ckpt_path=<it>",
        )

    def __str__(self) -> str:
        return self.strerror


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic: temporary file in the destination folder, fsync, rename."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as file:
                torch.save(checkpoint, file)
        except OSError as error:
            # Raised in the except block, not `from`: the CLI prints this one's message (as for OOM).
            raise CheckpointWriteError(path, error)  # noqa: B904


def check_writable(folder: Path) -> None:
    """Raise `CheckpointWriteError` unless a file can be created in `folder` (made if missing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vrft-write-check-"):
            pass
    except OSError as error:
        raise CheckpointWriteError(folder / "<checkpoint>", error)  # noqa: B904
