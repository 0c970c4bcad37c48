"""The stall checks: a warning when a run carries no learning signal, none for one uneventful step."""

from __future__ import annotations

import logging

from vrft.modules.health import TrainingHealth


def test_one_step_without_reward_spread_is_normal(caplog):
    health = TrainingHealth(stall_steps=3)
    with caplog.at_level(logging.WARNING):
        health.record_signal(zero_spread_fraction=1.0, grad_norm=0.0, mean_reward=1.0, step=1)
    assert health.warnings == {} and not caplog.records


def test_stall_steps_in_a_row_warn_once_and_are_counted(caplog):
    health = TrainingHealth(stall_steps=3)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 4):
            health.record_signal(zero_spread_fraction=1.0, grad_norm=0.0, mean_reward=2.0, step=step)
    assert health.warnings == {"no_reward_spread": 1}
    assert "for 3 steps every group's completions got the same reward" in caplog.text


def test_zero_gradient_despite_reward_spread_warns():
    health = TrainingHealth()
    health.record_signal(zero_spread_fraction=0.5, grad_norm=0.0, mean_reward=1.0, step=4)
    assert health.warnings == {"zero_grad_norm": 1}
