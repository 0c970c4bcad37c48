"""What every rollout engine is: the interface, the sampling settings it implements, the top-p rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vrft.rollout.batch import PromptBatch


class RolloutEngine:
    """Generates `[P*G, C]` completion token ids (G consecutive rows per prompt) with the current adapter."""

    name = "engine"

    def __init__(self):
        self.last_stats: dict[str, float] = {}  # timing of the last call, read by telemetry and benchmarks
        # [P*G, C] log-probs (at the sampling temperature) of the tokens the last call sampled, under the
        # weights it sampled from; None when those are the training-time model's own (plain `generate`).
        self.last_logprobs: Tensor | None = None

    def generate(
        self,
        policy: nn.Module,
        prompts: PromptBatch,
        group_size: int,
        generation: dict,
        eos_ids: list[int],
        pad_id: int,
    ) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Sampling:
    """The subset of `generate` settings the static engines implement."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0

    @classmethod
    def from_generation(cls, generation: dict) -> Sampling:
        unsupported = {k for k in generation if k not in {*cls.__dataclass_fields__, "top_k"}}
        if unsupported or generation.get("top_k") not in (None, 0):
            raise ValueError(
                f"generation settings {sorted(unsupported) or ['top_k']} are not supported by the static "
                "rollout engines; set algorithm.rollout_engine=hf"
            )
        fields = {k: v for k, v in generation.items() if k != "top_k"}
        return cls(**fields)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Mask tokens outside the smallest set whose probability reaches `top_p` (as `generate` does)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False  # keep at least the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
