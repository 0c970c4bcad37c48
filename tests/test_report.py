"""`python -m vrft.report` on folders it cannot use: one line naming the folder and the fix, exit 2."""

from __future__ import annotations

import pytest

from vrft import report as report_module
from vrft.report import main as report_main

METRICS = "step,train/reward,train/loss\n0,1.0,2.5\n1,1.5,2.25\n"


def run_folder(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(METRICS)
    return tmp_path


def test_a_plot_that_cannot_be_written_still_prints_the_table(tmp_path, capsys):
    # IsADirectoryError (or a read-only copy's PermissionError) from matplotlib, and no table
    run = run_folder(tmp_path)
    (run / "curves.png").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(run)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "  steps             2\n  train/reward      1.5\n  train/loss        2.25\n" in out
    assert err == (
        f"vrft: error: the plot '{run / 'curves.png'}' could not be written (Is a directory); the table above "
        "is complete: copy the run somewhere writable\n"
    )


def test_a_runs_logs_folder_names_the_run_folder(tmp_path, capsys):
    # "holds no run (no logs/metrics.csv in it or its subfolders)" for the folder that holds metrics.csv
    run = run_folder(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(run / "logs")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"vrft: error: '{run / 'logs'}' is a run's logs folder; pass the run folder '{run}'\n"
    )


def test_a_run_without_kl_has_no_kl_cell_and_its_kl_panel_says_why(tmp_path, monkeypatch):
    # loss.beta=0 logs no train/kl (nothing measured it): the table leaves it out and the panel stays empty,
    # with a note, rather than a 0 curve or an error.
    run = run_folder(tmp_path)  # METRICS: reward and loss only
    figures = []
    monkeypatch.setattr(report_module.plt, "close", figures.append)
    rows, plot = report_module.report(run)
    assert plot == run / "curves.png" and plot.is_file()
    assert "train/kl" not in rows[run.name]
    (figure,) = figures
    kl_panel = next(axis for axis in figure.axes if axis.get_title() == "KL to the reference")
    assert not kl_panel.lines
    assert [text.get_text() for text in kl_panel.texts] == [
        "not logged: loss.beta=0 skips the reference forward"
    ]
    monkeypatch.undo()  # plt.close closes again
    report_module.plt.close(figure)
