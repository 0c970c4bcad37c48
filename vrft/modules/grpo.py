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
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.health import TrainingHealth
from vrft.modules.losses import PolicyLoss, StepTotals, truncated_importance_weights
from vrft.modules.policy_module import PolicyModule
from vrft.modules.scoring import RewardSet, group_advantages
from vrft.rollout.batch import Rollout
from vrft.rollout.engines import build_rollout_engine
from vrft.rollout.generate import generate_rollout
from vrft.runtime.phases import PhaseTracker
from vrft.runtime.ranks import gradient_sync, reduce_over_ranks
from vrft.runtime.rng import prompt_seed, seeded_rng
from vrft.runtime.telemetry import peak_memory_gb, reset_peak_memory

log = logging.getLogger(__name__)


@dataclass
class GRPOSettings:
    """Knobs of the GRPO loop (the `algorithm` config group).

    Memory: `group_size x rollout_batch_size` sequences share one generation (KV cache grows with it);
    `update_micro_batch_size` completions share one forward/backward (activations grow with it);
    `logprob_chunk_size` positions share one fp32 logits buffer (chunk x vocab x 4 bytes).
    """

    group_size: int = 8  # G completions per prompt; Visual-RFT: 8 for 2B, 4 for 7B
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # >0 forces long completions (worst-case memory benchmarks)
    num_iterations: int = 1  # optimizer steps per rollout batch; >1 makes the ratio clipping bite
    prompts_per_step: int = 16  # prompts per optimizer step over all ranks, by accumulation (Visual-RFT: 16)
    rollout_batch_size: int = 2  # prompts generated together (times G sequences)
    update_micro_batch_size: int = 4  # completions per forward/backward in the update
    logprob_chunk_size: int = 1024  # positions per lm_head chunk
    rollout_engine: str = "hf"  # hf | bf16_copy | dequant | packed, see vrft.rollout.engines
    scale_rewards: bool = True  # divide advantages by the group std (False: Dr. GRPO)
    advantage_eps: float = 1e-4
    max_grad_norm: float | None = 1.0
    num_logged_samples: int = 4  # completions kept per step for the sample table
    max_bad_steps: int = 3  # non-finite optimizer steps in a row (each skipped) before the run stops
    stall_steps: int = 5  # steps in a row with no reward spread in any group before a warning
    # Truncated importance sampling for engines that sample from other weights than the training forward
    # (bf16_copy, dequant, packed): each token's policy-gradient term times min(pi_train / pi_sampler, cap).
    # null turns it off; `hf` samples from the training-time model itself, so it never applies there.
    rollout_is_cap: float | None = 2.0
    # Seeds each rollout by its rows and epoch (the same completions on any rank); None: the global RNG.
    rollout_seed: int | None = None

    def __post_init__(self):
        for key in (
            "rollout_batch_size",
            "prompts_per_step",
            "update_micro_batch_size",
            "max_new_tokens",
            "logprob_chunk_size",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key}={getattr(self, key)} must be >= 1")
        if not self.temperature > 0:
            # Temperature 0 divides the logits by zero: NaN log-probs from the first step.
            raise ValueError(
                f"algorithm.temperature={self.temperature} must be > 0 (GRPO needs sampled, differing "
                "completions; 1.0 is Visual-RFT's)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(
                f"algorithm.top_p={self.top_p} must be in (0, 1]; 1.0 samples from the whole vocabulary"
            )
        if self.group_size < 2:
            raise ValueError(
                f"algorithm.group_size={self.group_size}: group-normalised advantages need at least 2 "
                "completions per prompt; set algorithm.group_size>=2 (Visual-RFT uses 8)"
            )
        if self.prompts_per_step % self.rollout_batch_size:
            raise ValueError(
                f"algorithm.prompts_per_step={self.prompts_per_step} is not a multiple of "
                f"algorithm.rollout_batch_size={self.rollout_batch_size}; make it one (e.g. "
                f"{max(1, self.prompts_per_step // self.rollout_batch_size) * self.rollout_batch_size})"
            )
        sequences = self.rollout_batch_size * self.group_size
        if sequences % self.update_micro_batch_size:
            raise ValueError(
                f"algorithm.update_micro_batch_size={self.update_micro_batch_size} does not divide the "
                f"{sequences} sequences of a rollout (rollout_batch_size x group_size); pick a divisor of {sequences}"
            )
        if self.temperature <= 0:
            raise ValueError(
                f"algorithm.temperature={self.temperature}: GRPO samples and scores completions at this "
                "temperature and log-probs divide by it; set algorithm.temperature>0 (Visual-RFT uses 1.0)"
            )
        for key in ("max_bad_steps", "stall_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key}={getattr(self, key)} must be >= 1")
        if self.rollout_is_cap is not None and not self.rollout_is_cap >= 1:
            raise ValueError(
                f"algorithm.rollout_is_cap={self.rollout_is_cap} must be >= 1 (2.0 is a common cap) or null "
                "to turn the rollout mismatch correction off"
            )
        if self.num_iterations < 1:
            raise ValueError(f"algorithm.num_iterations={self.num_iterations} must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"algorithm.min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}"
            )

    @property
    def rollouts_per_step(self) -> int:
        """Training batches (each a rollout) accumulated into one optimizer step."""
        return self.prompts_per_step // self.rollout_batch_size


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
            rollout = generate_rollout(
                self.policy,
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
        rollout.stats.update(
            rollout_seconds=seconds,
            generated_tokens=float(lengths.sum()),
            completion_length_sum=float(lengths.sum()),
            completion_length_max=float(lengths.max()),
            truncated_count=float((lengths >= s.max_new_tokens).sum()),
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
        rollout.stats["reward_sum/total"] = float(total.sum())
        rollout.stats["reward_sq_sum/total"] = float((total**2).sum())
        rollout.stats["advantage_sq_sum"] = float((rollout.advantages**2).sum())
        rollout.stats["group_zero_std_count"] = float((total.view(-1, s.group_size).std(1) == 0).sum())
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
            for _ in range(s.num_iterations):
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
        s = self.settings
        strategy = self.trainer.strategy
        worst = {"completion_length_max", "rollout_peak_gb"}
        sums: dict[str, float] = {
            "loss": loss_total,
            "num_sequences": float(sum(r.num_sequences for r in rollouts)),
        }
        peaks: dict[str, float] = {
            "update_seconds": update_seconds,
            "update_peak_gb": peak_memory_gb(self.device),
        }
        for rollout in rollouts:
            for key, value in rollout.stats.items():
                into = peaks if key.endswith("_seconds") else sums
                into[key] = max(into.get(key, 0.0), value) if key in worst else into.get(key, 0.0) + value
        peaks.update({key: sums.pop(key) for key in worst & set(sums)})
        for key, value in stat_sums.items():  # `_max` statistics are maxima, the others sums
            (peaks if key.endswith("_max") else sums)[f"update/{key}"] = value
        peaks.update(self.phases.metrics())  # rollout/reference peaks (update: memory/update_peak_gb)
        sums, peaks = reduce_over_ranks(strategy, sums), reduce_over_ranks(strategy, peaks, op="max")

        def total(key: str) -> float:
            return sums.get(key, peaks.get(key, 0.0))

        n = sums["num_sequences"]
        tokens = max(total("update/token_count"), 1.0)
        mean_reward = total("reward_sum/total") / n
        metrics = {
            # Each rank's loss is its share scaled up by the rank count (see policy_update): average them.
            "train/loss": sums["loss"] / strategy.world_size,
            "train/reward": mean_reward,
            "train/reward_std": max(total("reward_sq_sum/total") / n - mean_reward**2, 0.0) ** 0.5,
            "train/advantage_std": (total("advantage_sq_sum") / n) ** 0.5,
            "train/zero_std_groups": total("group_zero_std_count") / (n / s.group_size),
            "train/kl": total("update/kl_sum") / tokens,
            "train/clip_fraction": total("update/clipped_sum") / tokens,
            "train/grad_norm": self._last_grad_norm,
            "train/completion_length": total("completion_length_sum") / n,
            "train/completion_length_max": peaks["completion_length_max"],
            "train/truncated_fraction": total("truncated_count") / n,
            # Special tokens an engine emitted despite suppression (cut out before any forward): should be 0.
            "train/suppressed_tokens": total("suppressed_tokens"),
            "train/lr": self.optimizers().param_groups[0]["lr"],
            "time/rollout_s": total("rollout_seconds"),
            "time/reference_s": total("reference_seconds"),
            "time/update_s": peaks["update_seconds"],
            "throughput/generated_tokens_per_s": total("generated_tokens")
            / max(total("rollout_seconds"), 1e-9),
            "memory/rollout_peak_gb": peaks["rollout_peak_gb"],
            "memory/update_peak_gb": peaks["update_peak_gb"],
        }
        self.health.record_signal(
            metrics["train/zero_std_groups"], metrics["train/grad_norm"], mean_reward, self.global_step
        )
        for name in self.rewards.names:
            metrics[f"reward/{name}"] = total(f"reward_sum/{name}") / n
        if "mismatch_sum" in stat_sums:  # the engine sampled from other weights than the training forward
            metrics["rollout/logprob_mismatch_mean"] = total("update/mismatch_sum") / tokens
            metrics["rollout/logprob_mismatch_max"] = peaks["update/mismatch_max"]
            if "is_truncated_sum" in stat_sums:
                metrics["rollout/is_truncated_fraction"] = total("update/is_truncated_sum") / tokens
        metrics.update({key: value for key, value in peaks.items() if key.startswith("memory/")})  # phases
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
