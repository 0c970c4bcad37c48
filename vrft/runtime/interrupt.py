"""Stopping a run from the keyboard or a scheduler without losing its finished steps.

A first Ctrl-C while training runs asks for what a scheduler's SIGTERM gets: Lightning finishes the running
optimizer step, `vrft.callbacks.Checkpoints` saves it, and the CLI names the checkpoint to resume from. A
second Ctrl-C stops at once, as Python's default does, and the running step is lost. Without this, Ctrl-C
raised KeyboardInterrupt wherever the run was, Lightning exited with code 1 and every step since the last
due checkpoint was gone.

Why not Lightning's own handling: it turns a KeyboardInterrupt into an immediate `sys.exit(1)` after
calling the callbacks' `on_exception`, possibly in the middle of an optimizer step, whose half-updated
state a checkpoint must not hold. Its SIGTERM handling already stops between steps; this routes the first
Ctrl-C there, and hides Lightning's lines about a SIGTERM for that stop: the user sent none.

The state is the process's: one command runs one job at a time (a Hydra sweep runs its jobs in turn).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StopRecord:
    """What the current command has been asked and has done about stopping."""

    ctrl_c: int = 0  # Ctrl-C presses since the command started
    graceful: bool = False  # a Trainer is fitting and stops between steps on SIGTERM
    saved: tuple[int, Path] | None = None  # (step, checkpoint) written when the run was stopped


STOP = StopRecord()

# Where Lightning logs the SIGTERM a first Ctrl-C is routed through: "Received SIGTERM: 15" (its signal
# handler) and "An SIGTERMException was raised ..., saved checkpoint to ..." (ModelCheckpoint, through
# rank_zero_info; fabric's name where only fabric set the logger up).
_SIGTERM_LOGGERS = (
    "lightning.pytorch.trainer.connectors.signal_connector",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropSigtermLines(logging.Filter):
    """Drops Lightning's lines that tell of a SIGTERM while a Ctrl-C stops the run: vrft's own lines say
    Ctrl-C and name the checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM" not in record.getMessage()


_DROP_SIGTERM_LINES = _DropSigtermLines()


def _hide_sigterm_lines(hide: bool) -> None:
    for name in _SIGTERM_LOGGERS:
        logger = logging.getLogger(name)
        if hide:
            logger.addFilter(_DROP_SIGTERM_LINES)  # once: addFilter skips a filter it has
        else:
            logger.removeFilter(_DROP_SIGTERM_LINES)


def _on_ctrl_c(signum, frame) -> None:
    STOP.ctrl_c += 1
    sigterm = signal.getsignal(signal.SIGTERM)
    if STOP.ctrl_c == 1 and STOP.graceful and callable(sigterm):
        print(
            "\nvrft: Ctrl-C: stopping after the running step, which is then checkpointed; press Ctrl-C again to "
            "stop at once and lose it",
            file=sys.stderr,
            flush=True,
        )
        _hide_sigterm_lines(True)  # until the fit ends (`stops_between_steps`): a real SIGTERM keeps them
        sigterm(signal.SIGTERM, frame)  # Lightning's handler: it sets the flag its loops check between steps
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def keyboard_stops() -> Iterator[StopRecord]:
    """Handle Ctrl-C as the module docstring says while the block runs (a CLI command); yields the record
    the CLI reads when the command ends. Outside the main thread (signals cannot be set there) it only
    yields the record."""
    STOP.ctrl_c, STOP.graceful, STOP.saved = 0, False, None
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        yield STOP
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def stops_between_steps() -> Iterator[None]:
    """Mark the block (a `Trainer.fit`) as one that a first Ctrl-C stops after its running step: Lightning
    has its SIGTERM handler in place while it fits."""
    STOP.graceful = True
    try:
        yield
    finally:
        STOP.graceful = False
        _hide_sigterm_lines(False)


def note_saved(step: int, path: Path) -> None:
    """Record the checkpoint written when the run was stopped, for the CLI's last line."""
    STOP.saved = (step, Path(path))
