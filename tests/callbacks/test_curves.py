"""`CurvesPlot` never ends a run: it plots while Lightning builds a checkpoint."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from vrft.callbacks.curves import CurvesPlot


def test_a_plot_that_cannot_be_written_is_logged_and_the_checkpoint_goes_on(tmp_path, caplog):
    # IsADirectoryError from matplotlib inside on_save_checkpoint ended the run before the checkpoint was saved
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/reward\n0,1.0\n1,1.5\n")
    (tmp_path / "curves.png").mkdir()
    callback = CurvesPlot(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="vrft.callbacks.curves"):
        callback.on_save_checkpoint(SimpleNamespace(is_global_zero=True), None, {})
    assert caplog.messages == [
        f"curves not written to {tmp_path / 'curves.png'} (Is a directory); `python -m vrft.report {tmp_path}` "
        "draws them later"
    ]
    (tmp_path / "curves.png").rmdir()
    assert callback.plot() == tmp_path / "curves.png"
