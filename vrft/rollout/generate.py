"""Rollout stage of GRPO: G sampled completions per prompt, kept as token tensors for the update."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vrft.rollout.base import RolloutEngine
from vrft.rollout.batch import Rollout, build_prompts, completion_mask
from vrft.rollout.hf import HFGenerate


@torch.no_grad()
def generate_rollout(
    policy,
    processor,
    rows: Sequence[dict],
    prompt_template: str,
    group_size: int,
    generation_kwargs: dict,
    device: torch.device,
    engine: RolloutEngine | None = None,
) -> Rollout:
    """Generate `group_size` completions for each row with the current policy (adapter active).

    All `len(rows) * group_size` sequences are generated together with a KV cache. `generation_kwargs`
    go to `generate` (sampling settings, `max_new_tokens`, ...). `engine` picks how (`vrft.rollout.engines`;
    default plain `generate`).
    """
    prompts = build_prompts(processor, rows, prompt_template, device)
    tokenizer = processor.tokenizer
    eos_ids = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    engine = engine or HFGenerate()
    completion_ids = engine.generate(
        policy, prompts, group_size, generation_kwargs, eos_ids, tokenizer.pad_token_id
    )
    mask = completion_mask(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    sampler_logprobs = engine.last_logprobs
    if sampler_logprobs is not None:
        sampler_logprobs = sampler_logprobs[:, : completion_ids.shape[1]].float().masked_fill(mask == 0, 0.0)
    return Rollout(
        sampler_logprobs=sampler_logprobs,
        prompts=prompts,
        group_size=group_size,
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=texts,
        rows=list(rows),
    )
