"""`vrft.cli`: which Hydra sweeper a command line runs (decided by its class), and what it may optimise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrft.cli import check_sweep, is_basic_sweeper

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# A user's own sweeper that happens to share the basic sweeper's class name: the old test of the name's
# ending took it for Hydra's grid.
NAMESAKE = "hydra_plugins.my_search.search.BasicSweeper"


def test_the_basic_sweeper_is_told_apart_by_its_class_not_its_name():
    assert is_basic_sweeper(BASIC)
    assert not is_basic_sweeper(OPTUNA)
    assert not is_basic_sweeper(NAMESAKE)
    assert not is_basic_sweeper("")


def test_only_the_basic_sweepers_jobs_are_listed_and_checked_before_the_sweep():
    checked = []
    check_sweep("train", ["-m", "seed=0,1,2"], checked.append)
    assert [cfg.seed for cfg in checked] == [0, 1, 2]  # the shipped grid: every job, before the first starts
    checked.clear()
    # Another sweeper chooses its own jobs: expanding its overrides as the grid's checks jobs it never runs
    check_sweep("train", ["-m", "seed=0,1,2", f"hydra.sweeper._target_={NAMESAKE}"], checked.append)
    assert checked == []


SEARCH = ["-m", "hparams_search=tiny_optuna"]


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ([], "data.val_split=null: no validation split"),
        (
            ["data.val_split=test", "algorithm.evaluator=null"],
            "algorithm.evaluator=null: no metric to validate with",
        ),
        (["data.val_split=test", "trainer.limit_val_batches=0"], "trainer.limit_val_batches=0"),
    ],
    ids=["no split", "no metric", "no batches"],
)
def test_a_search_optimising_a_validation_metric_it_never_logs_stops_before_the_first_trial(overrides, why):
    # the sweeper found the metric missing only when the first trial had trained
    with pytest.raises(ValueError) as error:
        check_sweep("train", [*SEARCH, "optimized_metric=val/accuracy", *overrides], lambda cfg: None)
    assert str(error.value).startswith(
        f"optimized_metric='val/accuracy' is a validation metric, and the search's runs never validate "
        f"({why})"
    )
    assert f"the sweeper ({OPTUNA})" in str(error.value)
    assert str(error.value).endswith(
        "or optimise a training metric: train/loss (every algorithm), train/reward (GRPO)"
    )


def test_the_search_exits_2_naming_the_metric_before_its_first_trial(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "VRFT_TRACEBACK"}
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "vrft.train",
        *SEARCH,
        "optimized_metric=val/map",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vrft: error: optimized_metric='val/map' is a validation metric" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sweep.exists()  # no trial started


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimized_metric=val/accuracy", "data.val_split=test"],  # validates: the metric can be logged
        ["optimized_metric=train/reward"],  # the shipped search
        ["optimized_metric=val/accuracy", "data.val_split=null,test"],  # a trial may validate
        ["optimized_metric=val/accuracy", "model=tiny,small"],  # a group may set anything
        # the split follows a swept key the check knows nothing of
        ["optimized_metric=val/accuracy", "data.val_split=${oc.select:split,null}", "+split=choice(test)"],
        ["optimized_metric=val/accuracy", "+callbacks.mine._target_=my_callbacks.ValScore"],  # may log val/*
    ],
    ids=["validates", "shipped", "swept split", "swept group", "interpolated split", "foreign callback"],
)
def test_a_search_is_stopped_only_where_its_config_settles_that_the_metric_is_never_logged(overrides):
    check_sweep("train", [*SEARCH, *overrides], lambda cfg: None)


def test_a_grid_optimises_nothing_so_its_metric_is_not_checked():
    checked = []
    check_sweep("train", ["-m", "seed=0,1", "optimized_metric=val/accuracy"], checked.append)
    assert len(checked) == 2


@pytest.mark.parametrize(("target", "optimises"), [(BASIC, False), (OPTUNA, True), (NAMESAKE, True)])
def test_train_asks_a_job_for_its_metric_under_any_sweeper_but_the_basic_one(monkeypatch, target, optimises):
    # vrft.train.optimizing_sweeper: the old test of the name's ending took a user's namesake for the grid, so
    # a misspelt optimized_metric went unnamed until the sweeper failed on the job's None
    from types import SimpleNamespace

    from hydra.types import RunMode

    import vrft.train

    job = SimpleNamespace(mode=RunMode.MULTIRUN, sweeper={"_target_": target})
    monkeypatch.setattr(vrft.train, "HydraConfig", SimpleNamespace(initialized=lambda: True, get=lambda: job))
    assert vrft.train.optimizing_sweeper() == (target if optimises else None)
