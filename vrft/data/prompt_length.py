"""Rows whose prompt, with the completion budget after it, would run past the model's context.

A Qwen2-VL prompt is its chat-templated text plus one placeholder token per merged image patch. A prompt
longer than `max_position_embeddings` (with `max_new_tokens` after it) ran on with positions the model was
never trained at, and nothing said so. The data module refuses such rows at setup, before the model loads.

The counts are computed, not processed: the text is tokenized once (no image goes through the processor), and
the image's tokens follow from its size alone, with the image processor's own resize rule
(`get_number_of_image_patches`, which transformers keeps for vLLM to do the same).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vrft.data.prompts import chat_prompt


@dataclass
class PromptBudget:
    """What a row's prompt may take of the model's context, built by the policy module from its processor and
    config.json (`PolicyModule.prompt_budget`).

    Args:
        processor: the run's Qwen2-VL processor (chat template, `tokenizer`, `image_processor`).
        prompt_template: the question shown with the image, formatted with the row's columns.
        context: the model's `max_position_embeddings`; None checks nothing (a config that sets none).
        completions: split role (`train`, `val`) -> (tokens a completion may add, the setting that says so, or
            None where nothing is generated after the prompt).
        max_pixels: the image budget (`model.max_pixels`), named in the fix.
    """

    processor: object
    prompt_template: str
    context: int | None
    completions: dict[str, tuple[int, str | None]]
    max_pixels: int

    def image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens of a `width` x `height` image: its resized patch grid over the merge window."""
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width)
        return patches // image_processor.merge_size**2


def image_size(image) -> tuple[int, int] | None:
    """(width, height) of an undecoded row image, from its header only; None where it cannot be read (the
    image check names that row, or the rollout does under `data.verify_images=false`)."""
    try:
        if isinstance(image, Image.Image):
            return image.size
        if isinstance(image, dict) and image.get("bytes"):
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return opened.size
        source = image.get("path") if isinstance(image, dict) else image
        with Image.open(Path(source)) as opened:
            return opened.size
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def length_faults(
    table, rows: list[int], budget: PromptBudget, role: str, sizes: dict[int, tuple[int, int]]
) -> dict[int, str]:
    """The rows among `rows` of `table` whose prompt plus the `role` split's completion budget exceeds
    `budget.context`, each with why and the fix. `sizes`: row -> (width, height) where the caller has decoded
    the image already; the others are read from the image's header."""
    if budget.context is None or not rows:
        return {}
    new_tokens, setting = budget.completions.get(role, (0, None))
    columns = [c for c in table.column_names if c != "image"]
    text = table.select_columns(columns)[: max(rows) + 1]
    processor = budget.processor
    prompts: dict[int, str] = {}
    for index in rows:
        try:
            question = budget.prompt_template.format(**{c: text[c][index] for c in columns})
        except (KeyError, IndexError, ValueError, AttributeError):
            continue  # a template naming no column is vrft.train's check_prompt_fields' to name
        prompts[index] = chat_prompt(processor, question)
    if not prompts:
        return {}
    # One batched call: the fast tokenizer runs the rows in parallel. Each prompt holds one image placeholder,
    # which the processor widens to the image's tokens.
    lengths = [len(ids) - 1 for ids in processor.tokenizer(list(prompts.values()))["input_ids"]]
    image_column = table.select_columns(["image"])
    per_size: dict[tuple[int, int], int] = {}  # datasets often share one image size: count it once
    faults = {}
    for index, text_tokens in zip(prompts, lengths, strict=True):
        image = image_column[index]["image"]
        size = sizes.get(index) or image_size(image)
        if size is None:
            continue
        if size not in per_size:
            per_size[size] = budget.image_tokens(*size)
        image_tokens = per_size[size]
        prompt = text_tokens + image_tokens
        if prompt + new_tokens <= budget.context:
            continue
        source = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        named = f"with image '{source}' " if source else ""
        after = f" and {setting}={new_tokens} more after it" if setting else ""
        shorter = f", or lower {setting}" if setting else ""
        faults[index] = (
            f"the prompt {named}is {prompt} tokens ({text_tokens} of text, {image_tokens} of the "
            f"{size[0]}x{size[1]} image){after}: {prompt + new_tokens} positions, past the model's context of "
            f"{budget.context} (max_position_embeddings); lower model.max_pixels (now {budget.max_pixels}), "
            f"shorten the prompt{shorter}"
        )
    return faults
