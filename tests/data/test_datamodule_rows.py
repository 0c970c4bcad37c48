"""The rows the data module keeps by their text are one rule (`text_faults`), read by the data module and by
training's check of the validation rows before anything loads."""

from __future__ import annotations

import datasets
import pytest
from hydra.utils import instantiate

import vrft.train
from tests.evaluation.support import CAT, NONE, detection_prompt, image
from tests.support import train_config as config
from vrft.data.datamodule import text_faults


class WarmStartReached(Exception):
    pass


FEATURES = datasets.Features(
    {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
)


def test_text_faults_names_a_blank_or_missing_problem_and_an_unparsable_solution():
    table = datasets.Dataset.from_list(
        [
            {"problem": detection_prompt("cat"), "solution": CAT},
            {"problem": "   ", "solution": CAT},
            {"problem": None, "solution": CAT},
            {"problem": detection_prompt("cat"), "solution": "no answer here"},
        ],
        features=datasets.Features({"problem": FEATURES["problem"], "solution": FEATURES["solution"]}),
    )
    check = instantiate(config("task=detection").task.check_solution)
    faults = text_faults(table, 4, check)
    assert sorted(faults) == [1, 2, 3]
    assert faults[1] == "problem '   ' is empty; give every row the question to ask"
    assert faults[2] == "problem None is empty; give every row the question to ask"
    assert sorted(text_faults(table, 4, None)) == [1, 2]  # no task checker: the solution is not read
    assert sorted(text_faults(table, 2, check)) == [1]  # data.max_*_rows: the first rows only


def test_validation_rows_checked_before_loading_are_the_rows_the_data_module_keeps(tmp_path, monkeypatch):
    # A blank problem is a bad row of the data module (dropped under data.on_bad_row=skip); the check before
    # loading read only "is it a string", so it asked the metric about it and stopped the run: "no category".
    def reached(*args, **kwargs):
        raise WarmStartReached

    monkeypatch.setattr(vrft.train, "apply_warm_start", reached)
    red = image((200, 30, 30))
    test_rows = [
        {"image": red, "problem": detection_prompt("cat"), "solution": CAT},
        {"image": red, "problem": "   ", "solution": NONE},  # blank: asks about no category
        {"image": red, "problem": detection_prompt("cat"), "solution": "no answer here"},
    ]
    train_rows = [{"image": red, "problem": detection_prompt("cat"), "solution": CAT}] * 4
    tables = {
        name: datasets.Dataset.from_list(rows, features=FEATURES)
        for name, rows in (("train", train_rows), ("test", test_rows))
    }
    datasets.DatasetDict(tables).save_to_disk(str(tmp_path / "data"))
    overrides = ["task=detection", "data=disk", f"data.path={tmp_path / 'data'}", "data.val_split=test"]
    cfg = config(*overrides, "data.on_bad_row=skip", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(WarmStartReached):
        vrft.train.fit(cfg)
    module = instantiate(cfg.data)
    module.setup("fit")
    assert module.splits["val"].indices == [0]
    assert module.skipped_rows == {"train": 0, "test": 2}
