"""Is the run learning? Two checks after every optimizer step, so a broken run says so instead of idling.

- Diverging: a step with a non-finite loss or gradient is skipped by the precision plugin (weights stay as
  they were); `max_bad_steps` such steps in a row stop the run with the phase where the non-finite value
  appeared, keeping the checkpoints written so far (all from finite weights).
- Stalled: GRPO learns from reward differences inside a group. When every group's rewards are equal for
  `stall_steps` steps in a row, or the gradient norm is exactly zero although some group had a reward
  spread, nothing moves the adapter: a warning names the likely causes, and `warnings` (counts by kind)
  goes into `run_summary.json`. (A zero gradient in a step where no group had a spread is the expected
  result of all-zero advantages: the stall count covers it, one such step alone is normal.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vrft.runtime.failures import TrainingFailure, last_checkpoint

log = logging.getLogger(__name__)

NO_SPREAD_CAUSES = (
    "likely causes: the format reward never matched (look at samples.jsonl: do completions use the "
    "<think>/<answer> tags the task's prompt asks for?), the rewards saturated (every completion already "
    "scores the same: a harder task or a higher algorithm.temperature), or the task does not fit the data "
    "(task=... must match the dataset's solutions)"
)


@dataclass
class TrainingHealth:
    """Counts bad and stalled optimizer steps of one run (see the module docstring)."""

    max_bad_steps: int = 3
    stall_steps: int = 5
    bad_streak: int = 0
    stall_streak: int = 0
    warnings: dict[str, int] = field(default_factory=dict)  # kind -> times warned, for run_summary.json

    def record_update(self, nonfinite: bool, phase: str, step: int, trainer) -> None:
        """After an optimizer step: raise `TrainingFailure` after `max_bad_steps` non-finite steps in a row.

        `phase` is where the first non-finite value was seen (`reference` or `update`).
        """
        self.bad_streak = self.bad_streak + 1 if nonfinite else 0
        if self.bad_streak >= self.max_bad_steps:
            raise TrainingFailure(
                phase,
                step,
                last_checkpoint(trainer),
                f"{self.bad_streak} optimizer steps in a row had a non-finite loss or gradient (each skipped, "
                "the weights are still finite); lower optimizer.lr, keep algorithm.max_grad_norm set, or use "
                "precision=fp32 to find the layer that overflows (algorithm.max_bad_steps sets the limit)",
            )

    def record_signal(self, zero_spread_fraction: float, grad_norm: float, mean_reward: float, step: int):
        """After an optimizer step: warn when the step carried no learning signal."""
        self.stall_streak = self.stall_streak + 1 if zero_spread_fraction >= 1.0 else 0
        if self.stall_streak == self.stall_steps:
            self._warn(
                "no_reward_spread",
                f"step {step}: for {self.stall_steps} steps every group's completions got the same reward "
                f"(mean reward {mean_reward:.3g}), so every advantage is zero and the adapter learns "
                f"nothing; {NO_SPREAD_CAUSES}",
            )
            self.stall_streak = 0
        if grad_norm == 0.0 and zero_spread_fraction < 1.0:
            self._warn(
                "zero_grad_norm",
                f"step {step}: the gradient norm is exactly zero although some groups' rewards differed, so "
                "the step changed nothing; likely causes: no trainable adapter reached the loss (lora.r, "
                "lora.target_modules), or every completion was cut to nothing (algorithm.max_new_tokens)",
            )

    def _warn(self, kind: str, message: str) -> None:
        self.warnings[kind] = self.warnings.get(kind, 0) + 1
        log.warning(message)
