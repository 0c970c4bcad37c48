"""Rollout/training mismatch: measured per token, and corrected by truncated importance sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.grpo import GRPOModule, GRPOSettings
from vrft.modules.losses import SequenceMeanLoss, StepTotals, truncated_importance_weights
from vrft.modules.scoring import WeightedReward
from vrft.rewards import format_reward
from vrft.rollout.static import DequantEngine


def tiny_grpo(engine: str, **settings) -> GRPOModule:
    torch.manual_seed(0)
    module = GRPOModule(
        model=ModelSpec(name_or_path="tiny", max_pixels=12544),
        lora=LoraSpec(r=4, alpha=8),
        loss=SequenceMeanLoss(beta=0.0),
        rewards={"format": WeightedReward(format_reward)},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        group_size=3,
        max_new_tokens=6,
        min_new_tokens=6,
        rollout_batch_size=2,
        prompts_per_step=2,
        update_micro_batch_size=2,
        rollout_engine=engine,
        **settings,
    )
    module.build_policy(torch.float32)
    return module


@pytest.fixture(scope="module")
def hf_module() -> GRPOModule:
    return tiny_grpo("hf")


@pytest.fixture(scope="module")
def dequant_module() -> GRPOModule:
    return tiny_grpo("dequant")


ROWS = [
    {
        "image": Image.new("RGB", (56, 84), (255, 0, 0)),
        "problem": "Colour?",
        "solution": "<answer>red</answer>",
    },
    {
        "image": Image.new("RGB", (112, 112), (0, 0, 255)),
        "problem": "Hue?",
        "solution": "<answer>blue</answer>",
    },
]


class ShiftedDequant(DequantEngine):
    """A deliberately mismatched engine: reports every sampled token 0.3 nats more likely than it is."""

    name = "shifted_dequant"

    def generate(self, *args, **kwargs):
        completion = super().generate(*args, **kwargs)
        self.last_logprobs = self.last_logprobs + 0.3
        return completion


def test_hf_rollouts_carry_no_sampler_logprobs_and_need_no_correction(hf_module):
    module = hf_module
    rollout = module.rollout(ROWS)
    assert rollout.sampler_logprobs is None
    weights, stats = module.mismatch_correction(rollout, torch.zeros(6, 6), rollout.completion_mask, 0, 2)
    assert weights is None and stats == {}


def test_static_engine_mismatch_is_measured_and_near_zero_in_fp32(dequant_module):
    module = dequant_module
    torch.manual_seed(1)
    rollout = module.rollout(ROWS)
    assert rollout.sampler_logprobs.shape == rollout.completion_ids.shape
    with torch.no_grad():
        train = module.rollout_logprobs(rollout)
    weights, stats = module.mismatch_correction(rollout, train[:2], rollout.completion_mask[:2], 0, 2)
    # fp32 weights on CPU, the same sampled ids scored by both paths: they differ only by the order of
    # floating-point sums (the static decoder's own matmuls), 1e-4 nats is ~100x what that gives here.
    assert float(stats["mismatch_max"]) < 1e-4
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=1e-4, rtol=0)


def test_a_shifted_sampler_is_reweighted_by_its_likelihood_ratio(dequant_module):
    module = dequant_module
    engine, module.rollout_engine = module.rollout_engine, ShiftedDequant()
    torch.manual_seed(1)
    try:
        rollout = module.rollout(ROWS)
    finally:
        module.rollout_engine = engine
    with torch.no_grad():
        train = module.rollout_logprobs(rollout)
    mask = rollout.completion_mask[:2]
    weights, stats = module.mismatch_correction(rollout, train[:2], mask, 0, 2)
    tokens = float(mask.sum())
    # The sampler claims 0.3 nats more than the training forward on every token: the weight is exp(-0.3).
    assert float(stats["mismatch_sum"]) / tokens == pytest.approx(0.3, abs=1e-4)
    torch.testing.assert_close(
        weights[mask.bool()], torch.full((int(tokens),), 0.3).neg().exp(), atol=1e-4, rtol=0
    )


def test_rollout_is_cap_below_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="algorithm.rollout_is_cap=0.5"):
        GRPOSettings(rollout_is_cap=0.5)


def test_corrected_policy_gradient_matches_the_on_policy_one(hf_module):
    """Tokens sampled from a perturbed policy: with the truncated IS weights the GRPO loss's gradient is the
    on-policy policy gradient; without them it is biased.

    The policy is the tiny model's next-token distribution at one prompt, restricted to its 12 most likely
    tokens (logits `z`, a leaf tensor); the sampler adds a fixed perturbation to `z`. The exact on-policy
    gradient of E_pi[A] is sum_y pi(y) A(y) grad log pi(y), computed by enumeration; the estimates use
    N = 200,000 tokens drawn with a fixed seed.
    """
    module = hf_module
    rollout = module.rollout(ROWS[:1] * 2)
    with torch.no_grad():
        inputs = rollout.prompts.take(torch.tensor([0]))
        logits = module.policy(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            mm_token_type_ids=inputs.mm_token_type_ids,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
        ).logits[0, -1]
    generator = torch.Generator().manual_seed(0)
    z = logits.topk(12).values.clone().requires_grad_(True)
    advantage = torch.randn(12, generator=generator)
    shift = (torch.rand(12, generator=generator) - 0.5) * 0.6  # |shift| <= 0.3: ratios within e^0.6 < cap 2
    pi = z.softmax(-1)
    exact = torch.autograd.grad((pi.detach() * advantage * z.log_softmax(-1)).sum(), z)[0]
    sampler_logprobs = (z.detach() + shift).log_softmax(-1)
    tokens = torch.multinomial(sampler_logprobs.exp(), 200_000, replacement=True, generator=generator)

    def loss_gradient(correct: bool) -> torch.Tensor:
        logprobs = z.log_softmax(-1)[tokens][:, None]  # [N, 1] one-token completions
        mask = torch.ones_like(logprobs)
        totals = StepTotals(num_sequences=len(tokens), num_tokens=len(tokens), max_completion_length=1)
        weights = (
            truncated_importance_weights(logprobs, sampler_logprobs[tokens][:, None], 2.0)
            if correct
            else None
        )
        loss, _ = SequenceMeanLoss(beta=0.0)(
            logprobs, logprobs.detach(), None, advantage[tokens], mask, totals, weights
        )
        return -torch.autograd.grad(loss, z)[0]  # the loss is minimised: its negative gradient ascends

    corrected, uncorrected = loss_gradient(True), loss_gradient(False)
    # Monte-Carlo error of the corrected estimate: each sample contributes w A grad log pi, whose entries are
    # bounded by max|w A| <= e^0.6 * max|A| < 2 * 3.5; with N = 2e5 the standard error per entry is below
    # 7 / sqrt(2e5) = 0.016, so 0.05 is > 3 standard errors (and the seed is fixed: the test is deterministic).
    assert (corrected - exact).abs().max() < 0.05
    # The bias of the uncorrected estimate, sum_y (mu - pi) A grad log pi, is far larger than that error.
    assert (uncorrected - exact).abs().max() > 4 * (corrected - exact).abs().max()
