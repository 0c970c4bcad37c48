"""A config-group choice that is no option in `conf/<group>/` ends in one line naming the choice, the group
and its options, before Hydra composes: Hydra's own error spans a dozen lines ending in its search path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from vrft.cli import check_composes, missing_config_message
from vrft.validation.overrides import check_config_groups

ROOT = Path(__file__).resolve().parents[2]
PRECISIONS = "auto, bf16, fp16, fp32, int4, int4_qat, int8, mixed, mixed_tiny"
HARDWARE = "2xrtx4090, a100-80g, cpu, h100-80g, rtx4080-16g, rtx4090"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["precision=in4"],
            f"precision=in4: no such option in conf/precision; choose one of {PRECISIONS}; did you mean int4?",
        ),
        (
            ["model=qwen2vl-7bb"],
            "model=qwen2vl-7bb: no such option in conf/model; choose one of local, qwen25vl-3b, qwen25vl-7b, "
            "qwen2vl-2b, qwen2vl-7b, small, tiny; did you mean qwen2vl-7b?",
        ),
        (
            ["+hw=rtx409"],
            f"+hw=rtx409: no such option in conf/hw; choose one of {HARDWARE}; did you mean rtx4090?",
        ),
        (  # as close to int4 as to int8: both are named
            ["precision=int5"],
            f"precision=int5: no such option in conf/precision; choose one of {PRECISIONS}; did you mean int4 or int8?",
        ),
        (["data=nope"], "data=nope: no such option in conf/data; choose one of disk, synthetic"),
        (
            ["trainer.max_steps=3", "-m", "precision=int4,in4"],
            f"precision=in4 (in precision=int4,in4): no such option in conf/precision; choose one of {PRECISIONS}; "
            "did you mean int4?",
        ),
        (
            ["precision=choice(bf16,in4)"],
            f"precision=in4 (in precision=choice(bf16,in4)): no such option in conf/precision; choose one of "
            f"{PRECISIONS}; did you mean int4?",
        ),
        (
            ["model@warm_start.model=tinyy"],
            "model@warm_start.model=tinyy: no such option in conf/model; choose one of local, qwen25vl-3b, "
            "qwen25vl-7b, qwen2vl-2b, qwen2vl-7b, small, tiny; did you mean tiny?",
        ),
        (
            ["callbacks=[default,nope]"],
            "callbacks=nope (in callbacks=[default,nope]): no such option in conf/callbacks; choose one of default",
        ),
    ],
    ids=[
        "precision",
        "model",
        "added group",
        "tie",
        "no close match",
        "multirun",
        "choice sweep",
        "package",
        "list",
    ],
)
def test_a_choice_that_is_no_option_is_named_with_the_groups_options(arguments, message):
    with pytest.raises(ValueError) as error:
        check_config_groups(arguments)
    assert str(error.value) == message
    # every entry point checks its command line with check_composes (train, evaluate, plan), sweeps included
    for config_name in ("train", "evaluate"):
        with pytest.raises(ValueError) as error:
            check_composes(config_name, arguments)
        assert str(error.value) == message


@pytest.mark.parametrize(
    "arguments",
    [
        ["trainer.max_steps=3", "algorithm.group_size=4", "+trainer.foo=1", "++seed=3"],  # keys, not groups
        ["precision=int4", "+hw=rtx4090", "model=qwen2vl-7b", "hparams_search=tiny_optuna"],
        ["-m", "precision=int4,bf16", "precision=glob(int*)", "model=choice(tiny,small)"],
        ["~hw", "~precision=int9", "precision=null", "model@warm_start.model=tiny"],  # Hydra's to judge
        ["hydra/job_logging=stdout", "hydra.run.dir=.", "hydra/sweeper=optuna"],  # Hydra's own groups
        ["--config-dir=/elsewhere", "precision=in4"],  # groups of another config tree
        ["hydra.searchpath=[file:///elsewhere]", "precision=in4"],
        ["precision=[int4"],  # a grammar error: Hydra names it
    ],
    ids=["keys", "options", "sweeps", "deletions", "hydra groups", "config dir", "search path", "grammar"],
)
def test_options_keys_and_what_is_hydras_to_judge_pass(arguments):
    check_config_groups(arguments)


def test_an_option_missing_from_a_configs_own_defaults_is_one_line(tmp_path):
    # a choice in a config file (an experiment's defaults list) is found by Hydra only as it composes
    (tmp_path / "precision").mkdir()
    (tmp_path / "precision" / "int4.yaml").write_text("bits: 4\n")
    (tmp_path / "precision" / "bf16.yaml").write_text("bits: 16\n")
    (tmp_path / "main.yaml").write_text("defaults:\n  - precision: in4\n")
    with (
        initialize_config_dir(str(tmp_path), version_base="1.3"),
        pytest.raises(MissingConfigException) as error,
    ):
        compose("main")
    assert missing_config_message(error.value) == (
        "In 'main': Could not find 'precision/in4'; the options in 'precision': bf16, int4"
    )


def run_cli(module: str, *arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "VRFT_TRACEBACK"}
    command = [sys.executable, "-m", module, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_the_plan_names_a_bad_choice_of_a_sweep_in_one_line(tmp_path):
    # the train command's run is in tests/test_bad_input.py (test_cli_exits_2_with_one_line)
    result = run_cli("vrft.plan", "-m", "precision=int4,in4", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[0] == (
        f"vrft: error: precision=in4 (in precision=int4,in4): no such option in conf/precision; choose one of "
        f"{PRECISIONS}; did you mean int4?"
    )
    assert "Traceback" not in result.stderr and "search path" not in result.stderr
    assert not (tmp_path / "sweep").exists()
