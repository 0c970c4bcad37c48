"""Every `conf/precision` and `conf/optimizer` choice instantiates, and the optimizers step on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vrft.precision import VrftPrecision

CONF = Path(__file__).resolve().parents[2] / "conf"
# The plugin modes (conf/precision also holds `auto`, which the memory planner resolves to one of them).
PRECISIONS = ["bf16", "fp16", "fp32", "int4", "int8", "mixed"]
OPTIMIZERS = ["adamw", "adamw8bit", "paged_adamw8bit"]


def test_every_mode_and_optimizer_has_a_config():
    assert {p.stem for p in (CONF / "precision").glob("*.yaml")} >= set(PRECISIONS)
    assert {p.stem for p in (CONF / "optimizer").glob("*.yaml")} >= set(OPTIMIZERS)


@pytest.mark.parametrize("name", PRECISIONS)
def test_precision_config_builds_the_plugin_of_that_name(name):
    path = CONF / "precision" / f"{name}.yaml"
    plugin = instantiate(OmegaConf.load(path))
    assert isinstance(plugin, VrftPrecision) and plugin.name == name
    # Every option carries a comment saying what it costs or saves.
    options = [
        line for line in path.read_text().splitlines() if line and not line.startswith(("#", "_target_"))
    ]
    assert all("  # " in line for line in options), options


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_config_steps_on_cpu(name):
    config = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    assert config._partial_ and config.lr == 1e-5 and config.weight_decay == 0.0
    # 8192 elements: above bitsandbytes' 4096-element floor for 8-bit state.
    param = torch.nn.Parameter(torch.randn(64, 128))
    before = param.detach().clone()
    optimizer = instantiate(config)([param])
    param.grad = torch.randn_like(param)
    with (
        pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
        if "paged" in name
        else _no_op()
    ):
        optimizer.step()
    assert not torch.equal(param, before)
    if name != "adamw":
        assert optimizer.state[param]["state1"].dtype == torch.uint8


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False
