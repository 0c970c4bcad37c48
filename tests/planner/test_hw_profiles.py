"""What each `+hw` profile says of the card: only keys vrft reads, and a budget line that names the profile."""

from __future__ import annotations

import pytest

from tests.support import train_config as config
from vrft.paths import config_dir
from vrft.planner.planning import budget_gb

PROFILES = sorted(path.stem for path in (config_dir() / "hw").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
def test_a_profile_sets_only_the_hw_keys_vrft_reads(profile):
    # every profile but cpu set hw.bandwidth_gb_s, "decode speed is reported against this bound": nothing read it
    assert set(config(f"+hw={profile}").hw) == set(config().hw) == {"name", "memory_gb"}


def test_a_profile_without_a_budget_is_named_as_such_on_a_cpu_machine(monkeypatch):
    # "no hw profile and no CUDA device" under +hw=cpu, a profile the user had just passed
    monkeypatch.setattr("vrft.planner.planning.device_total_gb", lambda: None)
    assert budget_gb(config("+hw=cpu")) == (None, "hw=cpu sets no memory_gb and no CUDA device")
    assert budget_gb(config()) == (None, "no hw profile and no CUDA device")
