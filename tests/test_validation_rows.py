"""Training's validation split is checked against the task's metric before anything loads: the metric first
runs at the first validation, after training steps."""

from __future__ import annotations

import datasets
import pytest

import vrft.train
from tests.evaluation.support import CAT, NONE, detection_prompt, image, schema_rows
from tests.support import train_config as config


class WarmStartReached(Exception):
    pass


@pytest.fixture
def detection_data(tmp_path, monkeypatch):
    """A detection set on disk whose test split gets `test_rows`; the warm start raises `WarmStartReached`."""

    def reached(*args, **kwargs):
        raise WarmStartReached

    monkeypatch.setattr(vrft.train, "apply_warm_start", reached)
    features = datasets.Features(
        {"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")}
    )

    def write(test_rows: list[dict]):
        splits = {"train": schema_rows("detection"), "test": test_rows}
        tables = {name: datasets.Dataset.from_list(rows, features=features) for name, rows in splits.items()}
        datasets.DatasetDict(tables).save_to_disk(str(tmp_path / "data"))
        return ["task=detection", "data=disk", f"data.path={tmp_path / 'data'}", "data.val_split=test"]

    return write


def test_a_validation_row_that_asks_about_no_category_is_named_before_the_warm_start(
    detection_data, tmp_path
):
    red = image((200, 30, 30))
    rows = [
        {"image": red, "problem": detection_prompt("cat"), "solution": CAT},
        {"image": red, "problem": "Find every object.", "solution": NONE},  # no category anywhere
    ]
    cfg = config(*detection_data(rows), f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=r"split 'test': 1 row\(s\) \(rows 1\) have no detection category"):
        vrft.train.fit(cfg)


def test_a_misspelt_evaluator_category_is_named_before_the_warm_start(detection_data, tmp_path):
    # it made val/map NaN at every validation (no row asks about it), without a word
    rows = [{"image": image((200, 30, 30)), "problem": detection_prompt("cat"), "solution": CAT}]
    cfg = config(*detection_data(rows), "task.evaluator.categories=[cta]", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(
        ValueError, match=r"task.evaluator.categories names \['cta'\], which no row of split 'test'"
    ):
        vrft.train.fit(cfg)


def test_rows_that_on_bad_row_skip_drops_are_not_checked(detection_data, tmp_path):
    red = image((200, 30, 30))
    rows = [
        {"image": red, "problem": detection_prompt("cat"), "solution": CAT},
        {"image": red, "problem": "Find every object.", "solution": "no answer here"},  # dropped by skip
    ]
    cfg = config(*detection_data(rows), "data.on_bad_row=skip", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(WarmStartReached):
        vrft.train.fit(cfg)
