"""What every vrft training algorithm shares: the LoRA policy, its optimizer, adapter-only checkpoints."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from vrft.data.prompt_length import PromptBudget
from vrft.models.policy import (
    REFERENCE_ADAPTER,
    LoraSpec,
    ModelSpec,
    attach_lora,
    base_model,
    load_base_model,
    load_processor_for,
)
from vrft.models.sharded import clean_name
from vrft.modules.logprobs import selective_logprobs
from vrft.rollout.base import RolloutEngine
from vrft.rollout.batch import Rollout
from vrft.rollout.generate import generate_rollout
from vrft.runtime.failures import TrainingFailure, last_checkpoint
from vrft.runtime.sharding import clip_grad_norm, in_root_forward


class PolicyModule(L.LightningModule):
    """Base Lightning module owning a Qwen2-VL policy with a LoRA adapter.

    The model is built in `configure_model`, in the dtype the precision plugin asks for; the plugin then
    quantises the base weights in its `convert_module`. Checkpoints keep only the trainable (adapter) weights
    plus RNG state; the frozen base comes from the model folder again on resume.

    Args:
        model: which checkpoint and image budget.
        lora: adapter settings.
        optimizer: partial optimizer taking the trainable parameters.
        scheduler: optional partial LR scheduler taking the optimizer (stepped per optimizer step).
        prompt_template: the question shown with the image, formatted with the row's columns.
        evaluator: the task's metric `(completions, rows) -> dict`, run on greedy completions in validation.
        eval_max_new_tokens: completion budget of validation / evaluation decoding.
    """

    def __init__(
        self,
        model: ModelSpec,
        lora: LoraSpec,
        optimizer: Callable,
        scheduler: Callable | None = None,
        prompt_template: str = "{problem}",
        evaluator: Callable | None = None,
        eval_max_new_tokens: int = 256,
    ):
        super().__init__()
        self.prompt_template = prompt_template
        self.evaluator = evaluator
        self.eval_max_new_tokens = eval_max_new_tokens
        self.predictions: list[dict] = []  # greedy completions of the last validation pass, with their rows
        self.eval_engine: RolloutEngine | None = None  # how validation decodes (None: plain generate)
        self.eval_generation: dict = {}  # more generate settings for validation (benchmarks force lengths)
        self.model_spec = model
        self.lora_spec = lora
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.strict_loading = False  # checkpoints hold the adapter only; checked in on_load_checkpoint
        self.policy = None
        self.processor = None
        self.max_grad_norm: float | None = None  # gradient clipping, set by the algorithm (None: off)
        self._last_grad_norm = float("nan")

    def build_policy(self, dtype: torch.dtype = torch.float32, weights: bool = True) -> None:
        """Load the base model in `dtype` and attach the adapter (idempotent); `weights=False` builds both on
        the meta device (their weights come from another rank)."""
        if self.policy is not None:
            return
        base = load_base_model(self.model_spec, dtype, weights)
        self.policy = attach_lora(base, self.lora_spec, self.model_spec.gradient_checkpointing)
        self.policy.train()  # from_pretrained returns eval mode; training mode turns gradient checkpointing on
        if self.processor is None:  # prompt_budget may have loaded it for the data module's row checks
            self.processor = load_processor_for(self.model_spec)

    def completion_budgets(self) -> dict[str, tuple[int, str | None]]:
        """Split role -> (tokens a completion may add after the prompt, the setting that says so): validation
        decodes `eval_max_new_tokens`; training rows, by default, nothing (an algorithm that generates says)."""
        return {"train": (0, None), "val": (self.eval_max_new_tokens, "algorithm.eval_max_new_tokens")}

    def prompt_budget(self) -> PromptBudget:
        """What a row's prompt may take of the model's context, for the data module's row checks at setup,
        before the model loads: the processor (loaded here once, kept for the run) and config.json's
        `max_position_embeddings` (under `text_config` in transformers 5, at the top in older configs)."""
        if self.processor is None:
            self.processor = load_processor_for(self.model_spec)
        config = self.model_spec.config()
        text = getattr(config, "text_config", config)
        return PromptBudget(
            processor=self.processor,
            prompt_template=self.prompt_template,
            context=getattr(text, "max_position_embeddings", None),
            completions=self.completion_budgets(),
            max_pixels=self.model_spec.max_pixels,
        )

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Inside, the policy is the reference: the starting adapter (`lora.init_adapter`), else the bare base."""
        if REFERENCE_ADAPTER not in self.policy.peft_config:
            with self.policy.disable_adapter():
                yield
            return
        active = self.policy.active_adapter
        self.policy.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            # set_adapter also moves requires_grad to the active adapter: switching back restores training.
            self.policy.set_adapter(active)

    @override
    def configure_model(self) -> None:
        # The precision plugin decides the dtype weights load in; quantisation follows in its convert_module.
        # The strategy, whether this rank reads them at all (under FSDP rank 0 alone does).
        self.build_policy(
            getattr(self.trainer.precision_plugin, "load_dtype", torch.float32),
            weights=getattr(self.trainer.strategy, "loads_weights", True),
        )

    def completion_logprobs(
        self, rollout: Rollout, first: int, last: int, temperature: float, chunk_size: int
    ) -> Tensor:
        """`[last - first, C]` fp32 log-probs of completions `[first, last)` given their prompts.

        Never the full-vocabulary logits of the batch: `selective_logprobs` runs `lm_head` in chunks of
        `chunk_size` positions. With grad when autograd is on (the update), without in the reference pass.
        """
        inputs = rollout.sequence_inputs(first, last)
        model = base_model(self.policy)

        def logprobs() -> Tensor:
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            length = rollout.completion_ids.shape[1]
            # Position t predicts token t + 1, so the completion is predicted from the C positions before it.
            return selective_logprobs(
                hidden[:, -length - 1 : -1],
                rollout.completion_ids[first:last],
                model.lm_head,
                temperature,
                chunk_size,
            )

        # Not the policy's forward (that would build full-vocabulary logits): run as it, for FSDP's sake.
        return in_root_forward(self.policy, logprobs)

    def generate(self, *args, **kwargs) -> Rollout:
        """`generate_rollout(self.policy, *args, **kwargs)`, run as the policy's forward (for FSDP's sake)."""
        return in_root_forward(self.policy, lambda: generate_rollout(self.policy, *args, **kwargs))

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after the precision plugin unscaled fp16 gradients, so the norm is real.
        # Over all ranks' gradient shards under FSDP (a collective there).
        self._last_grad_norm = clip_grad_norm(self.policy, self.max_grad_norm or float("inf"))

    @override
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # ------------------------------------------------------------------------------------- validation
    @override
    def on_validation_epoch_start(self) -> None:
        self.predictions = []

    @override
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        was_training = self.policy.training
        self.policy.eval()
        generation = dict(max_new_tokens=self.eval_max_new_tokens, do_sample=False, **self.eval_generation)
        rollout = self.generate(
            self.processor,
            batch,
            self.prompt_template,
            1,
            generation,
            self.device,
            self.eval_engine,
        )
        self.policy.train(was_training)
        for completion, row in zip(rollout.completions, batch, strict=True):
            self.predictions.append(
                {"completion": completion, **{k: v for k, v in row.items() if k != "image"}}
            )

    @override
    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None or not self.predictions:
            return
        metrics = self.evaluator([p["completion"] for p in self.predictions], self.predictions)
        values = {f"val/{key}": float(value) for key, value in metrics.items()}
        # Loggers get the optimizer step, as the training rows do (`GRPOModule.log_step`): under manual
        # optimization Lightning's own step counts batches, so a validation after step 2 of a run with two
        # batches a step was plotted at step 4. `self.log` feeds the progress bar and checkpoint monitors.
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
        for key, value in values.items():
            self.log(
                key,
                value,
                prog_bar=key.removeprefix("val/") in ("accuracy", "map", "miou"),
                logger=False,
                batch_size=len(self.predictions),
            )

    # ------------------------------------------------------------------------------------ checkpoints
    def trainable_state_keys(self) -> set[str]:
        # Names as checkpoints spell them: without the prefixes FSDP puts in front of wrapped modules.
        return {f"policy.{clean_name(name)}" for name, p in self.policy.named_parameters() if p.requires_grad}

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen base weights are the model folder's business: keep only the adapter (MBs, not GBs).
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [
            k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:  # raised before anything is written: the previous checkpoints stay the last good ones
            raise TrainingFailure(
                None,
                self.global_step,
                last_checkpoint(self.trainer),
                f"adapter weights {bad[:3]} hold NaN/inf; refusing to write a checkpoint from them",
            )
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Plain lists, so the checkpoint loads under torch.load(weights_only=True).
            "numpy": [
                value.tolist() if isinstance(value, np.ndarray) else value for value in np.random.get_state()
            ],
            "python": random.getstate(),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, expected = set(checkpoint["state_dict"]), self.trainable_state_keys()
        if saved != expected:
            missing, unexpected = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
            raise ValueError(
                f"checkpoint adapter does not match this run's LoRA (missing {missing}, unexpected {unexpected}); "
                "resume with the same model and lora settings the checkpoint was trained with"
            )
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            kind, keys, position, has_gauss, cached = rng["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
            random.setstate(rng["python"])
