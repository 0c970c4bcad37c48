"""GRPO as Visual-RFT runs it, as a Lightning module: rollout, scoring, policy update.

One `training_step` takes a batch of prompts through rollout and scoring and stores the result; once the
optimizer step's worth of prompts is in (`prompts_per_step`), the policy update runs `num_iterations`
optimizer steps over the stored rollouts in micro-batches. The reference policy is the same model with the
LoRA adapter disabled, so there is no second copy of the weights; a run that starts from an adapter
(`lora.init_adapter`, e.g. an SFT warm start) compares against a frozen copy of that adapter instead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from typing_extensions import override

from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.health import TrainingHealth
from vrft.modules.losses import PolicyLoss, StepTotals, truncated_importance_weights
from vrft.modules.policy_module import PolicyModule
from vrft.modules.scoring import RewardSet, group_advantages, zero_spread_groups
from vrft.modules.settings import GRPOSettings
from vrft.modules.step_metrics import step_metrics, step_totals
from vrft.rollout.batch import Rollout
from vrft.rollout.engines import build_rollout_engine
from vrft.rollout.tokens import stop_token_ids, truncated_completions
from vrft.runtime.phases import PhaseTracker
from vrft.runtime.ranks import gradient_sync, reduce_over_ranks
from vrft.runtime.rng import prompt_seed, seeded_rng
from vrft.runtime.telemetry import peak_memory_gb, reset_peak_memory

log = logging.getLogger(__name__)


class GRPOModule(PolicyModule):
    """GRPO fine-tuning of a Qwen2-VL policy with LoRA and verifiable rewards.

    Args:
        model: which checkpoint and image budget.
        lora: adapter settings.
        loss: a `PolicyLoss` (its class picks the aggregation).
        rewards: reward name -> `{fn, weight}`; the weighted sum is the reward.
        optimizer: partial optimizer taking the trainable parameters.
        scheduler: optional partial LR scheduler taking the optimizer (stepped per optimizer step).
        prompt_template / evaluator / eval_max_new_tokens: see `PolicyModule`.
        **settings: `GRPOSettings` fields.
    """

    settings_class = GRPOSettings  # what `**settings` accepts (vrft.validation checks it before loading)

    def __init__(
        self,
        model: ModelSpec,
        lora: LoraSpec,
        loss: PolicyLoss,
        rewards: RewardSet | Mapping,
        optimizer: Callable,
        scheduler: Callable | None = None,
        prompt_template: str = "{problem}",
        evaluator: Callable | None = None,
        eval_max_new_tokens: int = 256,
        **settings,
    ):
        super().__init__(model, lora, optimizer, scheduler, prompt_template, evaluator, eval_max_new_tokens)
        if lora.full:
            raise ValueError(
                "lora.full=true has no adapter to disable, and GRPO's KL reference is the model with its adapter "
                "disabled; train GRPO with LoRA (lora=default), and full fine-tuning with algorithm=sft"
            )
        self.loss = loss
        self.rewards = rewards if isinstance(rewards, RewardSet) else RewardSet(rewards)
        self.settings = GRPOSettings(**settings)
        self.max_grad_norm = self.settings.max_grad_norm
        self.automatic_optimization = False  # micro-batched updates and rollout reuse need manual steps
        self._pending: list[Rollout] = []
        self.samples: list[dict] = []  # latest completions, read by the sample-logging callback
        self.rollout_engine = build_rollout_engine(self.settings.rollout_engine)
        self.phases = PhaseTracker()  # names the running phase (OOM messages) and records its peak memory
        self.health = TrainingHealth(self.settings.max_bad_steps, self.settings.stall_steps)

    @property
    def batches_per_step(self) -> int:
        """Training batches per optimizer step on this rank (read by the progress bar): the step's prompts are
        split over the ranks (`vrft.distributed.check_prompt_split` made sure they divide)."""
        ranks = self._trainer.world_size if self._trainer is not None else 1
        return self.settings.rollouts_per_step // ranks

    @override
    def completion_budgets(self) -> dict[str, tuple[int, str | None]]:
        return {
            **super().completion_budgets(),
            "train": (self.settings.max_new_tokens, "algorithm.max_new_tokens"),
        }

    # ------------------------------------------------------------------------------------------ the loop
    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        if not self._pending:
            self.phases.reset()
        with self.phases("rollout", self.device):
            rollout = self.rollout(batch)
        self.score(rollout)
        self._pending.append(rollout)
        if len(self._pending) == self.batches_per_step:
            self.policy_update(self._pending)
            self._pending = []

    def rollout(self, rows: list[dict]) -> Rollout:
        """Stage 1: sample G completions per prompt with the current adapter."""
        s = self.settings
        reset_peak_memory(self.device)
        start = time.perf_counter()
        # Eval mode for generation: gradient checkpointing would otherwise switch the KV cache off.
        self.policy.eval()
        generation = dict(
            do_sample=True,
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0,
        )
        with self.rollout_rng(rows):
            rollout = self.generate(
                self.processor,
                rows,
                self.prompt_template,
                s.group_size,
                generation,
                self.device,
                engine=self.rollout_engine,
            )
        self.policy.train()
        seconds = time.perf_counter() - start
        lengths = rollout.completion_mask.sum(1).float()
        stops = stop_token_ids(self.processor.tokenizer)
        rollout.stats.update(
            rollout_seconds=seconds,
            generated_tokens=float(lengths.sum()),
            completion_length_sum=float(lengths.sum()),
            completion_length_max=float(lengths.max()),
            truncated_count=float(
                truncated_completions(rollout.completion_ids, rollout.completion_mask, stops).sum()
            ),
            rollout_peak_gb=peak_memory_gb(self.device),
        )
        return rollout

    def rollout_rng(self, rows: list[dict]):
        """The random state a rollout of `rows` samples from: keyed by the rows (`rollout_seed`), else global."""
        seed = self.settings.rollout_seed
        if seed is None:
            return contextlib.nullcontext()
        indices = [row.get("row_index", position) for position, row in enumerate(rows)]
        return seeded_rng(prompt_seed(seed, self.current_epoch, indices), self.device)

    def score(self, rollout: Rollout) -> None:
        """Stage 2: rewards, group advantages, and the fixed log-probs the loss compares against."""
        s = self.settings
        rows = [row for row in rollout.rows for _ in range(s.group_size)]
        solutions = [row["solution"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("image", "solution")}
        total, per_reward = self.rewards(rollout.completions, solutions, columns)
        rollout.advantages = group_advantages(total, s.group_size, s.advantage_eps, s.scale_rewards).to(
            self.device
        )
        rollout.stats.update({f"reward_sum/{name}": float(v.sum()) for name, v in per_reward.items()})
        # In float64: train/reward_std is sqrt(E[r^2] - E[r]^2), whose float32 cancellation logged a std of 1e-3
        # for a step whose rewards were all 2.1702408.
        rollout.stats["reward_sum/total"] = float(total.double().sum())
        rollout.stats["reward_sq_sum/total"] = float((total.double() ** 2).sum())
        rollout.stats["advantage_sq_sum"] = float((rollout.advantages**2).sum())
        rollout.stats["group_zero_std_count"] = float(zero_spread_groups(total, s.group_size).sum())
        self.samples = [
            {
                "problem": rows[i].get("problem", ""),
                "image": rows[i].get("image"),
                "completion": rollout.completions[i],
                "solution": solutions[i],
                "reward": float(total[i]),
                "rewards": {name: float(values[i]) for name, values in per_reward.items()},
                "advantage": float(rollout.advantages[i]),
            }
            for i in range(min(s.num_logged_samples, len(rows)))
        ]
        start = time.perf_counter()
        with self.phases("reference", self.device), torch.no_grad():
            if self.loss.beta > 0:
                with self.reference_policy():
                    rollout.ref_logprobs = self.rollout_logprobs(rollout)
            if s.num_iterations > 1:
                rollout.old_logprobs = self.rollout_logprobs(rollout)
        rollout.stats["reference_seconds"] = time.perf_counter() - start

    def policy_update(self, rollouts: list[Rollout]) -> None:
        """Stage 3: `num_iterations` optimizer steps over the stored rollouts, micro-batched."""
        s = self.settings
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        strategy = self.trainer.strategy
        # DDP averages the ranks' gradients, so each rank normalises by the step's totals over all ranks
        # divided by the rank count: the average is then exactly the gradient of the whole step's loss.
        local = {
            "num_sequences": sum(r.num_sequences for r in rollouts),
            "num_tokens": float(sum(r.completion_mask.sum() for r in rollouts)),
        }
        step_sums = reduce_over_ranks(strategy, local)
        totals = StepTotals(
            num_sequences=step_sums["num_sequences"] / strategy.world_size,
            num_tokens=step_sums["num_tokens"] / strategy.world_size,
            max_completion_length=s.max_new_tokens,
        )
        micro_batches = sum(-(-r.num_sequences // s.update_micro_batch_size) for r in rollouts)
        with self.phases("update", self.device):
            reset_peak_memory(self.device)
            start = time.perf_counter()
            for _ in range(self.iterations_left()):
                loss_total, stat_sums, done = 0.0, {}, 0
                for rollout in rollouts:
                    for first in range(0, rollout.num_sequences, s.update_micro_batch_size):
                        done += 1
                        last = first + s.update_micro_batch_size
                        logprobs = self.sequence_logprobs(rollout, first, last)
                        old = (
                            logprobs.detach()
                            if rollout.old_logprobs is None
                            else rollout.old_logprobs[first:last]
                        )
                        ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[first:last]
                        mask = rollout.completion_mask[first:last]
                        weights, mismatch = self.mismatch_correction(rollout, old, mask, first, last)
                        loss, stats = self.loss(
                            logprobs, old, ref, rollout.advantages[first:last], mask, totals, weights
                        )
                        stats.update(mismatch)
                        # Gradients cross ranks once per optimizer step: on its last micro-batch.
                        with gradient_sync(strategy, enabled=done == micro_batches):
                            self.manual_backward(loss)
                        loss_total += float(loss.detach())
                        for key, value in stats.items():
                            merge = max if key.endswith("_max") else (lambda a, b: a + b)
                            stat_sums[key] = merge(stat_sums.get(key, 0.0), float(value))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                nonfinite = getattr(self.trainer.precision_plugin, "last_step_nonfinite", False)
                phase = nonfinite_phase(rollouts) if nonfinite else "update"
                self.health.record_update(nonfinite, phase, self.global_step, self.trainer)
            update_seconds = time.perf_counter() - start
            self.log_step(rollouts, totals, loss_total, stat_sums, update_seconds)

    def iterations_left(self) -> int:
        """Optimizer steps this update takes: `num_iterations`, fewer where `trainer.max_steps` comes first.

        Each iteration is an optimizer step, and a run (its LR schedule, its step count) is counted in them: an
        update of 2 iterations at step 4 of a 5-step run took the run to 6.
        """
        iterations = self.settings.num_iterations
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0:
            iterations = min(iterations, max(1, max_steps - self.global_step))
        return iterations

    def mismatch_correction(
        self, rollout: Rollout, train_logprobs: Tensor, mask: Tensor, first: int, last: int
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Truncated importance weights `[B, C]` for completions `[first, last)` (None when the engine sampled
        from the training-time model or the correction is off), and mismatch statistics (sums and max of
        the per-token log-ratio between the training forward and the sampler)."""
        if rollout.sampler_logprobs is None:
            return None, {}
        sampler = rollout.sampler_logprobs[first:last]
        gap = (train_logprobs.detach() - sampler).abs() * mask
        stats = {"mismatch_sum": gap.sum(), "mismatch_max": gap.max()}
        cap = self.settings.rollout_is_cap
        if cap is None:
            return None, stats
        weights = truncated_importance_weights(train_logprobs, sampler, cap)
        stats["is_truncated_sum"] = ((weights >= cap) * mask).sum()
        return weights, stats

    # --------------------------------------------------------------------------------------- log-probs
    def sequence_logprobs(self, rollout: Rollout, first: int, last: int) -> Tensor:
        """`[last - first, C]` fp32 log-probs of completions `[first, last)` under the current model state."""
        s = self.settings
        return self.completion_logprobs(rollout, first, last, s.temperature, s.logprob_chunk_size)

    def rollout_logprobs(self, rollout: Rollout) -> Tensor:
        """`[N, C]` log-probs of a whole rollout, micro-batched like the update (call under no_grad)."""
        step = self.settings.update_micro_batch_size
        return torch.cat(
            [self.sequence_logprobs(rollout, i, i + step) for i in range(0, rollout.num_sequences, step)]
        )

    # ----------------------------------------------------------------------------------------- logging
    def log_step(
        self, rollouts, totals: StepTotals, loss_total: float, stat_sums: dict, update_seconds: float
    ):
        """Per optimizer step: rewards, KL, lengths, timing, throughput, memory, over all ranks.

        Counts and sums add over the ranks; seconds and memory peaks are the slowest rank's / the fullest
        card's (a step waits for its slowest rank).
        """
        strategy = self.trainer.strategy
        peaks = {"update_seconds": update_seconds, "update_peak_gb": peak_memory_gb(self.device)}
        peaks.update(self.phases.metrics())  # rollout/reference peaks (update: memory/update_peak_gb)
        sums, peaks = step_totals(rollouts, loss_total, stat_sums, peaks)
        sums, peaks = reduce_over_ranks(strategy, sums), reduce_over_ranks(strategy, peaks, op="max")
        metrics = step_metrics(sums, peaks, self.settings.group_size, strategy.world_size, self.rewards.names)
        metrics["train/grad_norm"] = self._last_grad_norm
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        mean_reward, n = metrics["train/reward"], sums["num_sequences"]
        self.health.record_signal(
            metrics["train/zero_std_groups"], metrics["train/grad_norm"], mean_reward, self.global_step
        )
        skipped = getattr(self.trainer.precision_plugin, "skipped_steps", None)
        if skipped is not None:
            metrics["train/skipped_steps"] = float(skipped)
        # Loggers get one row per optimizer step (Lightning's own step counter counts batches under manual
        # optimization); `self.log` only feeds the progress bar and `trainer.callback_metrics`.
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        progress = {"train/reward", "train/kl", "train/completion_length", "memory/update_peak_gb"}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in progress, logger=False, on_step=True, batch_size=n)


def nonfinite_phase(rollouts: list[Rollout]) -> str:
    """Where a non-finite loss came from: `reference` if a stored log-prob is non-finite, else `update`."""
    for rollout in rollouts:
        for stored in (rollout.ref_logprobs, rollout.old_logprobs):
            if stored is not None and not bool(torch.isfinite(stored).all()):
                return "reference"
    return "update"
