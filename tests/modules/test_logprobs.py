"""Chunked completion log-probs equal a plain full-vocabulary log-softmax, values and gradients."""

import torch

from vrft.modules.logprobs import selective_logprobs
from vrft.rollout.batch import completion_mask


def test_chunked_logprobs_match_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    chunked = selective_logprobs(hidden, targets, head, temperature=0.7, chunk_size=4)
    full = torch.log_softmax(head(hidden).float() / 0.7, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chunked, full)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    (grad_full,) = torch.autograd.grad(full.sum(), hidden)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 1, 1, 1, 1]])
    mask = completion_mask(ids, eos_token_ids=[9, 8])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
