"""GRPO policy losses: one clipped-ratio objective with a k3 KL penalty, aggregated three ways.

The aggregation is what differs between Visual-RFT (mean over a completion's tokens, then over completions),
DAPO (mean over all tokens of the step) and Dr. GRPO (sum over tokens divided by a constant). Each is a
subclass that overrides `aggregate`; the config picks the class.

Accumulation: an optimizer step covers many micro-batches. Every micro-batch loss is normalised by the totals
of the whole step (`StepTotals`), so summing the micro-batch gradients gives exactly the gradient of the
step's loss, whatever the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepTotals:
    """Sizes of the whole optimizer step that a micro-batch belongs to."""

    # Under DDP both are the whole step's count divided by the rank count: DDP averages the ranks' gradients.
    num_sequences: float  # completions in the step (prompts x group size)
    num_tokens: float  # completion tokens in the step (sum of completion_mask)
    max_completion_length: int  # the max_new_tokens setting, Dr. GRPO's constant


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, >= 0.

    Shapes: `[B, C]` in, `[B, C]` out.
    """
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def truncated_importance_weights(train_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Per-token weights `min(pi_train / pi_sampler, cap)` that correct for a rollout sampled from slightly
    different weights (a bf16 copy, a fused kernel, a compiled decode) than the training forward.

    The policy gradient is an expectation under the training-time policy; tokens drawn from the sampler's
    distribution instead are reweighted by the likelihood ratio, truncated at `cap` so that the rare token
    the sampler under-weights cannot blow up the variance (truncated importance sampling). Shapes: `[B, C]`
    in (no grad needed), `[B, C]` out, detached.
    """
    return torch.exp(train_logprobs.detach() - sampler_logprobs).clamp(max=cap)


class PolicyLoss:
    """Clipped policy-gradient loss with a KL penalty against the reference policy.

    Args:
        beta: weight of the k3 KL term (Visual-RFT: 0.04). 0 skips the reference forward entirely.
        epsilon: lower clip range of the probability ratio (PPO: 0.2). Only active when a rollout
            batch is reused (`num_iterations > 1`); on-policy the ratio is exactly 1.
        epsilon_high: upper clip range; defaults to `epsilon` (DAPO raises it, e.g. 0.28).
    """

    name = "policy"

    def __init__(self, beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None):
        if beta < 0:
            raise ValueError(
                f"loss.beta={beta} is negative; use 0 to disable the KL penalty or a value like 0.04"
            )
        if epsilon <= 0:
            raise ValueError(f"loss.epsilon={epsilon} must be > 0 (PPO uses 0.2)")
        if epsilon_high is not None and epsilon_high < 0:
            # clamp(ratio, 1 - epsilon, 1 + epsilon_high) with an upper bound below 1 zeroes the gradient of
            # every row with a positive advantage
            raise ValueError(
                f"loss.epsilon_high={epsilon_high} must be >= 0, or null for loss.epsilon (DAPO uses 0.28)"
            )
        self.beta = beta
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high

    def __call__(
        self,
        logprobs: Tensor,  # [B, C] current policy, with grad
        old_logprobs: Tensor,  # [B, C] policy that sampled the rollout (no grad)
        ref_logprobs: Tensor | None,  # [B, C] adapter-disabled reference, None when beta == 0
        advantages: Tensor,  # [B]
        completion_mask: Tensor,  # [B, C] 1 on completion tokens up to and including EOS
        totals: StepTotals,
        is_weights: Tensor | None = None,  # [B, C] rollout/training mismatch correction, no grad
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's share of the step loss, and detached statistics (sums, for exact averaging)."""
        mask = completion_mask.to(logprobs.dtype)
        ratio = torch.exp(logprobs - old_logprobs)
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon_high)
        adv = advantages.unsqueeze(1)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        if is_weights is not None:  # the policy-gradient term only: the KL term is exact either way
            per_token = per_token * is_weights
        stats = {}
        if ref_logprobs is not None and self.beta > 0:
            kl = k3_kl(logprobs, ref_logprobs)
            per_token = per_token + self.beta * kl
            stats["kl_sum"] = (kl * mask).sum().detach()
        is_clipped = ((ratio < 1 - self.epsilon) & (adv < 0)) | ((ratio > 1 + self.epsilon_high) & (adv > 0))
        stats["clipped_sum"] = (is_clipped.to(mask.dtype) * mask).sum().detach()
        stats["token_count"] = mask.sum().detach()
        loss = self.aggregate(per_token * mask, mask, totals)
        return loss, stats

    def aggregate(self, masked_loss: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
        """Reduce masked per-token losses `[B, C]` to this micro-batch's share of the step loss."""
        raise NotImplementedError


class SequenceMeanLoss(PolicyLoss):
    """Visual-RFT / original GRPO: mean over each completion's tokens, then mean over completions."""

    name = "sequence_mean"

    def aggregate(self, masked_loss: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
        per_sequence = masked_loss.sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / totals.num_sequences


class TokenMeanLoss(PolicyLoss):
    """DAPO: mean over all completion tokens of the step, so long completions weigh by their length."""

    name = "token_mean"

    def aggregate(self, masked_loss: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
        return masked_loss.sum() / max(totals.num_tokens, 1)


class ConstantNormLoss(PolicyLoss):
    """Dr. GRPO: sum over tokens divided by a constant (completions x max length): no length bias."""

    name = "constant_norm"

    def aggregate(self, masked_loss: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
        return masked_loss.sum() / (totals.num_sequences * totals.max_completion_length)
