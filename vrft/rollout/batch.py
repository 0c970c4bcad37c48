"""The rollout's data: prompt batches (processor outputs) and the completions sampled for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from vrft.data.prompts import chat_prompt


@dataclass
class PromptBatch:
    """Processor outputs for `P` prompts (left-padded), each with one image."""

    input_ids: Tensor  # [P, Lp]
    attention_mask: Tensor  # [P, Lp]
    mm_token_type_ids: Tensor  # [P, Lp] 1 on image placeholder tokens
    pixel_values: Tensor  # [sum of patches over the P images, patch_dim]
    image_grid_thw: Tensor  # [P, 3] patch grid (t, h, w) of each image

    @property
    def patch_counts(self) -> list[int]:
        return self.image_grid_thw.prod(dim=-1).tolist()

    def take(self, index: Tensor) -> PromptBatch:
        """The prompts at `index` (repeats allowed), in that order, each with its image patches."""
        patches = torch.split(self.pixel_values, self.patch_counts)
        return PromptBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            mm_token_type_ids=self.mm_token_type_ids[index],
            pixel_values=torch.cat([patches[i] for i in index.tolist()]),
            image_grid_thw=self.image_grid_thw[index],
        )

    def repeated(self, times: int) -> PromptBatch:
        """Each prompt `times` times in a row (`[P*times, ...]`), its image patches with it."""
        return self.take(torch.arange(self.input_ids.shape[0]).repeat_interleave(times))


@dataclass
class Rollout:
    """Completions of a prompt batch, `G` consecutive rows per prompt, plus what scoring adds."""

    prompts: PromptBatch
    group_size: int
    completion_ids: Tensor  # [P*G, C] right-padded with pad_token_id
    completion_mask: Tensor  # [P*G, C] 1 up to and including the first EOS
    completions: list[str]  # [P*G] decoded text, special tokens removed
    rows: list[dict]  # [P] dataset rows (image, problem, solution, other columns)
    advantages: Tensor | None = None  # [P*G]
    old_logprobs: Tensor | None = None  # [P*G, C] only when a rollout is reused (num_iterations > 1)
    ref_logprobs: Tensor | None = None  # [P*G, C] only when beta > 0
    # [P*G, C] log-probs under the weights the engine sampled from (a bf16 copy, a fused kernel); None when
    # the engine is the training-time model itself. 0 past the completion mask.
    sampler_logprobs: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]

    def sequence_inputs(self, start: int, stop: int) -> dict[str, Tensor]:
        """Model inputs (prompt + completion) for completions `[start, stop)`, images repeated per group."""
        p = self.prompts.take(torch.arange(start, stop) // self.group_size)
        completion_ids = self.completion_ids[start:stop]
        return dict(
            input_ids=torch.cat([p.input_ids, completion_ids], dim=1),
            attention_mask=torch.cat([p.attention_mask, self.completion_mask[start:stop]], dim=1),
            mm_token_type_ids=torch.cat([p.mm_token_type_ids, torch.zeros_like(completion_ids)], dim=1),
            pixel_values=p.pixel_values,
            image_grid_thw=p.image_grid_thw,
        )


def build_prompts(processor, rows: Sequence[dict], prompt_template: str, device: torch.device) -> PromptBatch:
    """Apply the chat template to each row's question and process its image."""
    texts, images = [], []
    for row in rows:
        texts.append(chat_prompt(processor, prompt_template.format(**row)))
        image = row["image"]
        images.append(image if isinstance(image, Image.Image) else Image.open(image))
    # Left padding puts every prompt's last token at the same position, where generation starts.
    encoded = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    return PromptBatch(
        input_ids=encoded["input_ids"].to(device),
        attention_mask=encoded["attention_mask"].to(device),
        mm_token_type_ids=encoded["mm_token_type_ids"].to(device),
        pixel_values=encoded["pixel_values"].to(device),
        image_grid_thw=encoded["image_grid_thw"].to(device),
    )


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """`[N, C]` mask that is 1 up to and including each row's first EOS token (all ones if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    length = completion_ids.shape[1]
    first_eos = torch.where(
        is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long()
