"""The loggers of a run: metrics.csv survives a run resumed into its own folder."""

from __future__ import annotations

import csv

from vrft.loggers import CSVLogger


def logged(save_dir, steps: range) -> None:
    logger = CSVLogger(save_dir, name="logs", version="")
    for step in steps:
        logger.log_metrics(
            {"train/reward": float(step), **({"train/kl": 0.5} if step > 2 else {})}, step=step
        )
    logger.save()


def rows(save_dir) -> list[dict]:
    with (save_dir / "logs" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_resumed_run_keeps_the_rows_before_its_checkpoint(tmp_path):
    logged(tmp_path, range(1, 7))  # a run killed after step 6
    logged(tmp_path, range(5, 9))  # resumed into the same folder from the step-4 checkpoint
    assert [int(row["step"]) for row in rows(tmp_path)] == list(range(1, 9))
    assert [row["train/kl"] for row in rows(tmp_path)][:3] == ["", "", "0.5"]
    logged(tmp_path, range(1, 3))  # a fresh run from step 1 replaces every row
    assert [int(row["step"]) for row in rows(tmp_path)] == [1, 2]
