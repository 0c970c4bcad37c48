"""Which tokens a completion may contain: the stop tokens end it, the other special tokens are never sampled.

A Qwen2-VL forward counts `<|image_pad|>` (and the video / vision tokens) in `input_ids` as image
placeholders. A completion re-read by the reference and update forwards must therefore not contain one, or
the forward fails ("Image features and image tokens do not match") hours into a run. The set comes from the
loaded tokenizer's added special tokens, not from hard-coded ids, so a later checkpoint's tokens are covered.
"""

from __future__ import annotations

import torch
from torch import Tensor

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that end a completion (`<|im_end|>`, `<|endoftext|>`)."""
    return [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]


def truncated_completions(completion_ids: Tensor, mask: Tensor, stop_ids: list[int]) -> Tensor:
    """`[N]` True where a completion `[N, C]` has no stop token under its mask: generation cut it at
    `max_new_tokens`. Its length alone cannot tell: a completion whose stop token is the last one allowed
    is as long as a cut one."""
    stops = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    return ~(stops & mask.bool()).any(1)


def suppressed_token_ids(tokenizer) -> list[int]:
    """Sorted ids of the added special tokens a completion must not contain: all but the stop tokens.

    `tokenizer` may also be a processor (its `.tokenizer` is used).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    stops = set(stop_token_ids(tokenizer))
    return sorted(
        index
        for index, token in tokenizer.added_tokens_decoder.items()
        if token.special and index not in stops
    )


def sanitise_completions(
    completion_ids: Tensor, mask: Tensor, suppressed: list[int], pad_id: int
) -> tuple[Tensor, Tensor, int]:
    """End each completion `[N, C]` at its first suppressed token: that token becomes `pad_id` (a stop
    token in Qwen2, `<|endoftext|>`) and is the completion's last masked position; the rest is padding.

    The second line of defence behind sampling-time suppression: whatever an engine emitted, the forwards
    that re-read completions never see a placeholder token, and no completion becomes empty (the loss
    divides by its length). Returns `(ids, mask [N, C], number of suppressed tokens found)`.
    """
    banned = torch.isin(completion_ids, torch.tensor(suppressed, device=completion_ids.device))
    banned &= mask.bool()
    found = int(banned.sum())
    if found == 0:
        return completion_ids, mask, 0
    before = banned.long().cumsum(1) - banned.long() == 0  # no banned token strictly before this position
    mask = mask * before.long()
    ids = completion_ids.masked_fill(banned | (mask == 0), pad_id)
    return ids, mask, found
