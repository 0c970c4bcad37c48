"""Settings a probe found checked late or not at all: typo'd `+key` overrides, values refused only once the
model or the warm start has loaded (the loss, the data module's choice, the starting adapter), ranges the
planner and the seed took silently, and `vrft.evaluate`, which ran none of train's checks.

In-process like tests/test_bad_input.py, with two real CLI runs for the path through Hydra's own overrides.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.support import LENGTH_REWARD
from tests.support import train_config as config
from vrft.cli import user_errors  # noqa: F401  (importing vrft.cli registers the resolvers the configs use)
from vrft.evaluate import evaluate
from vrft.modules.losses import SequenceMeanLoss
from vrft.validation import check_added_keys, check_settings, validate

ROOT = Path(__file__).resolve().parents[1]


def evaluate_config(*overrides: str):
    """`conf/evaluate.yaml` composed with `overrides`, as `python -m vrft.evaluate` composes it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


# (config name, overrides, text the one-line error must contain)
ADDED = [
    ("train", ["+max_steps=5"], "max_steps is not a vrft setting (+max_steps=5 adds a key nothing reads); did you mean trainer.max_steps?"),
    ("train", ["+task.clases=[red,blue]"], "task.clases is not a vrft setting (+task.clases=[red,blue] adds a key nothing reads); did you mean task.classes?"),
    ("train", ["+learning_rate=1e-5"], "did you mean optimizer.lr?"),
    ("train", ["+max_prompt_length=512"], "max_prompt_length is TRL's name, not a vrft setting"),
    ("train", ["+zzz=1"], "zzz is not a vrft setting (+zzz=1 adds a key nothing reads); see the settings with python -m vrft.train --cfg job"),
    ("evaluate", ["+max_new_token=4"], "max_new_token is not a vrft setting (+max_new_token=4 adds a key nothing reads); did you mean max_new_tokens?"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "overrides", "message"), ADDED, ids=[" ".join(o) for _, o, _ in ADDED])
def test_an_added_key_nothing_reads_is_named_with_the_closest_setting(name, overrides, message):
    cfg = evaluate_config(*overrides) if name == "evaluate" else config(*overrides)
    with pytest.raises(ValueError) as error:
        check_added_keys(cfg, name, overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["+hw=rtx4090", "precision=int4"],  # a config group, not a key
        ["+experiment=small_parity_classification"],
        ["logger=wandb", "+logger.wandb.offline=true"],  # under a _target_: its signature decides
        LENGTH_REWARD,  # a node with its own _target_
        ["++seed=3"],  # a key the config has
    ],
    ids=["group", "experiment", "under a target", "a target node", "existing key"],
)
def test_added_groups_and_keys_something_reads_pass(overrides):
    cfg = config(*overrides)
    check_added_keys(cfg, "train", overrides)
    validate(cfg)


def test_an_init_adapter_folder_that_holds_no_adapter_is_named(tmp_path):
    with pytest.raises(ValueError, match="has no adapter_config.json; point it at a peft adapter folder"):
        validate(config(f"lora.init_adapter={tmp_path}"))
    (tmp_path / "adapter_config.json").write_text("{}")
    validate(config(f"lora.init_adapter={tmp_path}"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=local"], "model.name_or_path is not set (???)"),
        (["data=disk"], "data.path is not set (???)"),
        (["min_new_tokens=8", "max_new_tokens=4"], "min_new_tokens=8 exceeds max_new_tokens=4"),
        (["min_new_tokens=-1"], "min_new_tokens=-1 must be >= 0"),
        (["loss.beta=-1"], "loss.beta=-1 must be >= 0"),
    ],
    ids=["no model", "no data", "min above max", "negative min", "train's ranges"],
)
def test_evaluate_runs_trains_checks_first(overrides, message):
    with pytest.raises(ValueError) as error:
        evaluate(evaluate_config(*overrides))
    assert message in str(error.value)


def test_evaluate_defaults_pass_the_checks():
    check_settings(evaluate_config())


def test_a_negative_epsilon_high_is_refused_by_the_loss_itself():
    with pytest.raises(ValueError, match="loss.epsilon_high=-0.5 must be >= 0"):
        SequenceMeanLoss(epsilon_high=-0.5)
    assert SequenceMeanLoss(epsilon_high=0.0).epsilon_high == 0.0


@pytest.mark.parametrize(
    ("module", "override", "message"),
    [
        ("vrft.train", "+max_steps=5", "did you mean trainer.max_steps?"),
        ("vrft.evaluate", "+max_new_token=4", "did you mean max_new_tokens?"),
    ],
    ids=["train", "evaluate"],
)
def test_cli_names_an_added_key_nothing_reads(tmp_path, module, override, message):
    env = {key: value for key, value in os.environ.items() if key != "VRFT_TRACEBACK"}
    command = [sys.executable, "-m", module, f"hydra.run.dir={tmp_path / 'run'}", "warm_start=none", override]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vrft: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
