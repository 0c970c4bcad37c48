"""`python -m vrft.report` on folders it cannot use: one line naming the folder and the fix, exit 2."""

from __future__ import annotations

import pytest

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
