"""Checkpoint writes are atomic: a kill mid-write, a full disk or a read-only folder never corrupts one."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vrft.runtime.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, check_writable

# A child process that writes a checkpoint slowly (one byte chunk at a time with a pause), so the parent can
# kill it mid-write: `torch.save` is given a file object whose `write` sleeps.
SLOW_WRITER = """
import sys, time, torch
from vrft.runtime.checkpoint_io import AtomicCheckpointIO
real_save = torch.save
def slow_save(obj, file):
    class Slow:
        def write(self, data):
            for start in range(0, len(data), 4096):
                file.write(data[start:start + 4096]); file.flush(); time.sleep(0.01)
            return len(data)
        def flush(self):
            file.flush()
    real_save(obj, Slow())
torch.save = slow_save
AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(200_000)}, sys.argv[1])
"""


def test_a_kill_during_the_write_leaves_the_previous_checkpoint_whole(tmp_path):
    destination = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(3)}, destination)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(destination)], cwd=root)
    try:
        # Wait (without a time assertion) until the new checkpoint is partly written, then kill the writer.
        while not any(p.stat().st_size > 8192 for p in tmp_path.glob(".last.ckpt.*.partial")):
            assert child.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(destination)["weights"], torch.zeros(3))


def test_a_full_disk_removes_the_partial_file_keeps_the_old_one_and_names_the_fix(tmp_path, monkeypatch):
    destination = tmp_path / "step-2.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, destination)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"step-2.ckpt'.*No space left.*disk is full.*hydra.run.dir"
    ):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, destination)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2.ckpt"]  # no partial file left
    assert torch.load(destination)["step"] == 1


def test_a_read_only_folder_is_found_before_the_model_loads(tmp_path, monkeypatch):
    # Tests run as root here, which ignores file modes: the read-only filesystem is injected.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.NamedTemporaryFile", read_only)
    with pytest.raises(CheckpointWriteError, match="Read-only file system; the filesystem is read-only"):
        check_writable(tmp_path / "run")
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match="read-only"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "run" / "last.ckpt")
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_the_cli_refuses_an_unwritable_run_folder_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from tests.test_run_health import config, run_cli_main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.NamedTemporaryFile", read_only)
    monkeypatch.setattr("vrft.train.build_run", lambda *a, **k: pytest.fail("the run was built"))
    code, stderr = run_cli_main(config(tmp_path / "run"), capsys)
    assert code == 2
    assert "vrft: error: could not write checkpoint" in stderr and "hydra.run.dir" in stderr


def test_a_checkpoint_follows_the_umask_and_its_rename_is_made_durable(tmp_path, monkeypatch):
    # The temporary file was owner-only (mkstemp's 0600), so a checkpoint another user of the group would
    # resume or export from was unreadable; and a rename is on disk only once its folder is fsynced.
    synced_folders = []
    real_fsync = os.fsync

    def record(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            synced_folders.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert synced_folders == [str(tmp_path)]
