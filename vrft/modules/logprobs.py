"""Log-probabilities of completion tokens without materialising full-vocabulary fp32 logits.

A batch of 16 completions x 256 tokens over Qwen2's 151,936-token vocabulary is 2.5 GB of fp32 logits, and
autograd would keep another copy for the backward. Instead the language model returns hidden states, and the
`lm_head` + log-softmax run over chunks of positions, each chunk under activation checkpointing: only the
chunk's hidden states are kept, its logits are rebuilt during the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: Tensor, targets: Tensor, lm_head: nn.Module, temperature: float) -> Tensor:
    logits = lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    # log p(target) = logit[target] - logsumexp(logits): no [rows, V] log-softmax tensor is kept.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def selective_logprobs(
    hidden: Tensor, targets: Tensor, lm_head: nn.Module, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Log-probabilities of `targets` under `lm_head(hidden) / temperature`, in fp32.

    Args:
        hidden: `[B, C, H]` hidden states at the positions that predict the targets.
        targets: `[B, C]` token ids.
        chunk_size: rows (positions) per chunk; each chunk allocates `chunk_size x vocab` fp32 logits.
    Returns:
        `[B, C]` fp32 log-probabilities.
    """
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(-1, width)
    flat_targets = targets.reshape(-1)
    chunks = []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        h, t = flat_hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(checkpoint(_chunk_logprobs, h, t, lm_head, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(h, t, lm_head, temperature))
    return torch.cat(chunks).view(batch, length)
