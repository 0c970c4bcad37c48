"""`vrft.cli`: which Hydra sweeper a command line runs, decided by its class."""

from __future__ import annotations

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
    # Another sweeper chooses its own jobs: expanding its overrides as the grid's would check jobs it never runs
    check_sweep("train", ["-m", "seed=0,1,2", f"hydra.sweeper._target_={NAMESAKE}"], checked.append)
    assert checked == []
