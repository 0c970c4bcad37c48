"""The GRPO loop's settings (the `algorithm` config group), validated when built."""

from __future__ import annotations

from dataclasses import dataclass


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
                f"algorithm.temperature={self.temperature} must be > 0: GRPO samples and scores completions "
                "at this temperature and log-probs divide by it; set algorithm.temperature>0 (Visual-RFT "
                "uses 1.0)"
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
        for key in ("max_bad_steps", "stall_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"algorithm.{key}={getattr(self, key)} must be >= 1")
        if not self.advantage_eps > 0:
            # A group whose rewards are all equal has std 0: the advantages would divide by zero (NaN losses).
            raise ValueError(
                f"algorithm.advantage_eps={self.advantage_eps} must be > 0: it keeps the advantages finite where "
                "a group's rewards are all equal; e.g. algorithm.advantage_eps=1e-4"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"algorithm.max_grad_norm={self.max_grad_norm} must be > 0, or null for no clipping (a negative "
                "norm flips the gradients: torch scales them by it)"
            )
        if self.rollout_is_cap is not None and not self.rollout_is_cap >= 1:
            raise ValueError(
                f"algorithm.rollout_is_cap={self.rollout_is_cap} must be >= 1 (2.0 is a common cap) or null "
                "to turn the rollout mismatch correction off"
            )
        if self.num_iterations < 1:
            raise ValueError(f"algorithm.num_iterations={self.num_iterations} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            # `generate` takes a negative minimum silently (as 0): a typo would go unnoticed.
            raise ValueError(
                f"algorithm.min_new_tokens={self.min_new_tokens} must be between 0 and "
                f"algorithm.max_new_tokens={self.max_new_tokens}; lower min_new_tokens (0 lets a completion end "
                "whenever it stops) or raise max_new_tokens"
            )

    @property
    def rollouts_per_step(self) -> int:
        """Training batches (each a rollout) accumulated into one optimizer step."""
        return self.prompts_per_step // self.rollout_batch_size
