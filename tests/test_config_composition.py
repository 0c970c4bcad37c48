"""Every config composes with the main one and passes vrft's checks: each choice of each group of
conf/train.yaml's defaults, each hardware profile (`+hw=...`) and each experiment (`+experiment=...`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import vrft.cli  # noqa: F401  (registers the resolvers the task configs use)
from vrft.validation import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
# Choices that need a value from the user before they compose into a run.
NEEDS_INPUT = {"model=local": ["model.name_or_path=/models/qwen2-vl"], "data=disk": ["data.path=/data/set"]}
SKIPPED_GROUPS = {"experiment", "hw", "hparams_search"}  # `+`-groups (below) and the sweeper's search


def _options() -> list[list[str]]:
    options = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in SKIPPED_GROUPS):
        for choice in sorted(group.glob("*.yaml")):
            override = f"{group.name}={choice.stem}"
            options.append([override, *NEEDS_INPUT.get(override, [])])
    for group in ("hw", "experiment"):
        options += [[f"+{group}={choice.stem}"] for choice in sorted((CONF / group).glob("*.yaml"))]
    return options


@pytest.mark.parametrize("overrides", _options(), ids=lambda overrides: overrides[0])
def test_config_composes_and_passes_the_checks(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
