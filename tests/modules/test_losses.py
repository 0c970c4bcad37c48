"""The GRPO loss against hand-computed tensors, for each aggregation."""

import math

import pytest
import torch

from vrft.modules.losses import ConstantNormLoss, SequenceMeanLoss, StepTotals, TokenMeanLoss, k3_kl

# Two completions: the first 2 tokens long, the second 1 token long (mask pads the rest).
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])
TOTALS = StepTotals(num_sequences=2, num_tokens=3, max_completion_length=3)


def on_policy(logp):
    return logp.clone().requires_grad_(True)


def test_k3_kl_is_zero_at_equality_and_matches_formula():
    logp = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    ref = torch.tensor([[-1.5, -1.0]])
    # exp(d) - d - 1 with d = ref - logp = (-0.5, 1.0)
    expected = torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    torch.testing.assert_close(k3_kl(logp, ref), expected)


@pytest.mark.parametrize(
    ("loss_cls", "expected"),
    [
        # per-token loss on-policy without KL is -A: row 1 -> [-1, -1], row 2 -> [2].
        # sequence mean: mean(-1, -1) = -1 and 2 -> (-1 + 2) / 2 sequences = 0.5
        (SequenceMeanLoss, 0.5),
        # token mean: (-1 - 1 + 2) / 3 tokens = 0
        (TokenMeanLoss, 0.0),
        # constant normaliser: (-1 - 1 + 2) / (2 sequences * 3 max tokens) = 0
        (ConstantNormLoss, 0.0),
    ],
)
def test_aggregations_without_kl(loss_cls, expected):
    logp = on_policy(torch.full((2, 3), -1.0))
    loss, stats = loss_cls(beta=0.0)(logp, logp.detach(), None, ADV, MASK, TOTALS)
    assert loss.item() == pytest.approx(expected)
    assert stats["token_count"].item() == 3
    assert "kl_sum" not in stats


def test_gradient_of_sequence_mean_is_advantage_over_length():
    logp = on_policy(torch.zeros(2, 3))
    loss, _ = SequenceMeanLoss(beta=0.0)(logp, logp.detach(), None, ADV, MASK, TOTALS)
    loss.backward()
    # d loss / d logp_t = -A_i / |o_i| / num_sequences on masked tokens, 0 elsewhere.
    expected = torch.tensor([[-1 / 2 / 2, -1 / 2 / 2, 0.0], [2 / 1 / 2, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_kl_term_and_stats_hand_computed():
    logp = on_policy(torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]))
    ref = torch.tensor([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    beta = 0.5
    loss, stats = SequenceMeanLoss(beta=beta)(logp, logp.detach(), ref, ADV, MASK, TOTALS)
    kl = k3_kl(logp.detach(), ref)  # row 1: [0, e^-1 + 1 - 1, .], row 2: [e^1 - 1 - 1, ., .]
    kl_row1 = (kl[0, 0] + kl[0, 1]) / 2
    kl_row2 = kl[1, 0]
    expected = ((-1 + beta * kl_row1) + (2 + beta * kl_row2)) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert stats["kl_sum"].item() == pytest.approx((kl[0, 0] + kl[0, 1] + kl[1, 0]).item())


def test_clipping_stops_gradient_beyond_epsilon():
    old = torch.zeros(1, 2)
    # ratio = e^0.5 ~ 1.65 > 1.2 with positive advantage: clipped, no gradient; ratio 1 token keeps it.
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, stats = TokenMeanLoss(beta=0.0, epsilon=0.2)(
        logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), StepTotals(1, 2, 2)
    )
    loss.backward()
    # loss = -(min(1.65, 1.2) * 1 + 1 * 1) / 2 = -(1.2 + 1) / 2
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)
    assert stats["clipped_sum"].item() == 1


def test_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(4)
    totals = StepTotals(4, int(mask.sum()), 5)
    for loss_fn in (SequenceMeanLoss(beta=0.0), TokenMeanLoss(beta=0.0), ConstantNormLoss(beta=0.0)):
        full, _ = loss_fn(logp, logp, None, adv, mask, totals)
        halves = sum(
            loss_fn(logp[i : i + 2], logp[i : i + 2], None, adv[i : i + 2], mask[i : i + 2], totals)[0]
            for i in (0, 2)
        )
        assert full.item() == pytest.approx(halves.item(), abs=1e-6)


def test_bad_loss_settings_name_the_value():
    with pytest.raises(ValueError, match="loss.beta=-1"):
        SequenceMeanLoss(beta=-1)
    with pytest.raises(ValueError, match="loss.epsilon=0"):
        SequenceMeanLoss(epsilon=0)
