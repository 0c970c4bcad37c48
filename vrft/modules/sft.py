"""Supervised fine-tuning (SFT) on the same model, data and precision stack as GRPO.

The target of each row is its `solution` as the assistant turn, with a short reasoning span in front:
`<think>{reasoning}</think><answer>{answer}</answer>` followed by `<|im_end|>`. Only those target tokens enter
the cross-entropy; the prompt (system turn, image, question) is context, never a label. Visual-RFT compares
GRPO against exactly this baseline, and vrft uses it to give the tiny model a warm start GRPO can improve on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from typing_extensions import override

from vrft.models.policy import LoraSpec, ModelSpec
from vrft.modules.policy_module import PolicyModule
from vrft.modules.settings import GRPOSettings
from vrft.rewards.parsing import extract_answer
from vrft.rollout.batch import Rollout, build_prompts

log = logging.getLogger(__name__)
END_OF_TURN = "<|im_end|>"


def sft_target(row: dict, reasoning_template: str | None) -> str:
    """The assistant turn SFT teaches for `row`: `<think>reasoning</think><answer>answer</answer>`.

    `reasoning_template` is formatted with the row's columns plus `answer` (the text inside the solution's
    `<answer>`); `None` keeps the solution as it is (no reasoning span). Deterministic, so the target of a row
    never changes between epochs or runs.
    """
    solution = row["solution"]
    if reasoning_template is None:
        return solution
    answer = extract_answer(solution)
    if answer is None:
        raise ValueError(
            f"solution {solution!r} has no <answer>...</answer>, so no SFT target can be built from it; "
            "wrap the ground truth as <answer>...</answer>"
        )
    try:
        reasoning = reasoning_template.format(answer=answer, **row)
    except KeyError as error:
        raise ValueError(
            f"algorithm.reasoning_template={reasoning_template!r} names column {error} that the row lacks "
            f"(columns: {sorted(row)}); use one of those, {{answer}}, or set it to null"
        ) from None
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def target_batch(
    processor, rows: Sequence[dict], targets: Sequence[str], prompt_template: str, device
) -> Rollout:
    """Prompts and targets laid out like a rollout with one completion per prompt.

    The prompt part is left-padded (as for generation) and the target part right-padded, so the target
    tokens sit at the same positions GRPO scores completions at and the same log-prob code serves both.
    Returns a `Rollout` whose `completion_ids` `[B, T]` are the target tokens (with `<|im_end|>`) and whose
    `completion_mask` `[B, T]` is 1 on them and 0 on padding.
    """
    prompts = build_prompts(processor, rows, prompt_template, device)
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # The turn's end token is appended by id: text containing "<|im_end|>" could tokenise differently.
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] + [end_id] for text in targets]
    length = max(len(ids) for ids in encoded)
    completion_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        completion_ids[i, : len(ids)] = torch.tensor(ids)
        completion_mask[i, : len(ids)] = 1
    return Rollout(
        prompts=prompts,
        group_size=1,
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        completions=list(targets),
        rows=list(rows),
    )


class SFTModule(PolicyModule):
    """Cross-entropy fine-tuning on each row's solution (prompt tokens masked), with LoRA.

    Args:
        model / lora / optimizer / scheduler / prompt_template / evaluator / eval_max_new_tokens: see
            `PolicyModule`.
        reasoning_template: the `<think>` text before the answer, formatted with the row's columns and
            `answer`; `None` trains on the solution as it is.
        max_grad_norm: gradient clipping (None: off).
        logprob_chunk_size: positions per fp32 logits chunk (chunk x vocab x 4 bytes).
        batch_size: rows per optimizer step (the data module reads it).
        **rollout_settings: GRPO settings that a hardware profile or model preset sets under `algorithm` for
            either algorithm (`group_size`, `max_new_tokens`, `rollout_engine`, ...). SFT generates nothing
            while training: they are logged as ignored.
    """

    settings_class = GRPOSettings  # what `**rollout_settings` accepts (checked by vrft.validation)

    def __init__(
        self,
        model: ModelSpec,
        lora: LoraSpec,
        optimizer: Callable,
        scheduler: Callable | None = None,
        prompt_template: str = "{problem}",
        evaluator: Callable | None = None,
        eval_max_new_tokens: int = 256,
        reasoning_template: str | None = "The image shows a {answer}.",
        max_grad_norm: float | None = 1.0,
        logprob_chunk_size: int = 1024,
        batch_size: int = 8,
        **rollout_settings,
    ):
        super().__init__(model, lora, optimizer, scheduler, prompt_template, evaluator, eval_max_new_tokens)
        unknown = sorted(set(rollout_settings) - set(GRPOSettings.__dataclass_fields__))
        if unknown:
            raise TypeError(
                f"algorithm=sft has no setting {unknown}; its settings are in conf/algorithm/sft.yaml"
            )
        if rollout_settings:
            log.info("algorithm=sft ignores the GRPO rollout settings %s", rollout_settings)
        if batch_size < 1:
            raise ValueError(f"algorithm.batch_size={batch_size} must be >= 1")
        self.reasoning_template = reasoning_template
        self.max_grad_norm = max_grad_norm
        self.logprob_chunk_size = logprob_chunk_size
        self.batch_size = batch_size
        self._last_stats: dict[str, float] = {}
        self.samples: list[dict] = []  # read by the sample-logging callback; SFT has no completions to show

    def sft_loss(self, rows: Sequence[dict]) -> tuple[Tensor, dict[str, float]]:
        """Mean token cross-entropy over the batch's target tokens, and detached statistics."""
        targets = [sft_target(row, self.reasoning_template) for row in rows]
        batch = target_batch(self.processor, rows, targets, self.prompt_template, self.device)
        logprobs = self.completion_logprobs(batch, 0, batch.num_sequences, 1.0, self.logprob_chunk_size)
        mask = batch.completion_mask.to(logprobs.dtype)
        tokens = mask.sum()
        loss = -(logprobs * mask).sum() / tokens.clamp(min=1)
        stats = {"train/target_tokens": float(tokens), "train/perplexity": float(torch.exp(loss.detach()))}
        return loss, stats

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> Tensor:
        loss, self._last_stats = self.sft_loss(batch)
        self._last_stats["train/loss"] = float(loss.detach())
        return loss

    @override
    def on_train_batch_end(self, outputs, batch: list[dict], batch_idx: int) -> None:
        # After the optimizer step, so the row is logged under the step count GRPO would use for it.
        metrics = dict(self._last_stats)
        metrics["train/grad_norm"] = self._last_grad_norm
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        for key, value in metrics.items():
            self.log(
                key, value, prog_bar=key == "train/loss", logger=False, on_step=True, batch_size=len(batch)
            )
