"""Rollout engines: how the G completions per prompt are generated. Chosen by `algorithm.rollout_engine`.

- `hf`: `model.generate` on the training-time model. Per decode step it pays Python and kernel-launch
  overhead for every layer, and on bnb 4-bit weights it dequantises every matrix: about the same time per
  step for 2B and 7B, far from the GPU's bandwidth.
- `bf16_copy`: the static decoder (`vrft.memory.decoder`) over a bf16 copy of the language model with the
  current LoRA merged in, one decode step replayed as a CUDA graph. Memory: +2 bytes per language-model
  parameter for the duration of the rollout.
- `dequant`: the same decoder and graph, but weights stay packed and are dequantised one matrix at a time
  inside the step, with LoRA applied unmerged. Memory: one bf16 matrix of scratch; for 7B on 16 GB.
- `packed`: as `dequant`, but the decode steps multiply the packed 4-bit weights in a fused Triton kernel
  (`vrft.memory.packed`): no bf16 matrix is written. Needs Triton and a CUDA GPU of compute capability 8.0+.

The static engines prefill each prompt once (not G times), copy its KV cache to its G rows, and sample with
the same distribution as `generate` (temperature, top-p, min/max new tokens), so their completions are
samples of the training-time policy; `tests/memory/test_fast_rollout.py` checks greedy equality.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from vrft.kernels.nf4_matmul import environment_unsupported
from vrft.memory.decoder import DecoderWeights, DecodeState, decode_step, decoder_weights, prefill, text_parts
from vrft.memory.packed import PACKED_FIX, with_kernel_layers

if TYPE_CHECKING:
    from vrft.modules.rollout import PromptBatch

log = logging.getLogger(__name__)


class RolloutEngine:
    """Generates `[P*G, C]` completion token ids (G consecutive rows per prompt) with the current adapter."""

    name = "engine"

    def __init__(self):
        self.last_stats: dict[str, float] = {}  # timing of the last call, read by telemetry and benchmarks

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


class InverseCdfSampler(LogitsProcessor):
    """Sampling as the last logits processor of greedy decoding: the returned scores are 0 at a token drawn
    from softmax(scores / T) (top-p filtered as `generate` does) and -inf elsewhere, so greedy picks it.

    The same distribution as `generate(do_sample=True)`, drawn by inverting the cumulative distribution with
    one uniform number per row. `torch.multinomial` draws one exponential number per vocabulary entry: over
    the 152k-token Qwen2 vocabulary that is ~50 ms per decode step on 2 CPU cores against ~3 ms here, and
    most of a small model's rollout time.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0):
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scaled = scores.float() / self.temperature
        if self.top_p < 1.0:
            scaled = _top_p_filter(scaled, self.top_p)
        cumulative = scaled.softmax(dim=-1).cumsum(dim=-1)
        draw = torch.rand(scores.shape[0], 1, device=scores.device) * cumulative[:, -1:]
        token = torch.searchsorted(cumulative, draw, right=True).clamp_max(scores.shape[-1] - 1)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, token, 0.0)


class HFGenerate(RolloutEngine):
    """Plain `model.generate` with a dynamic KV cache: the reference behaviour.

    On CPU, sampling goes through `InverseCdfSampler` (same distribution, no `torch.multinomial`), over
    prompts repeated G times; on CUDA it is untouched `generate`, the baseline the static engines are
    measured against.
    """

    name = "hf"

    def generate(self, policy, prompts, group_size, generation, eos_ids, pad_id) -> Tensor:
        start = time.perf_counter()
        if generation.get("do_sample") and prompts.input_ids.device.type == "cpu":
            sampler = InverseCdfSampler(generation.get("temperature", 1.0), generation.get("top_p", 1.0))
            generation = {k: v for k, v in generation.items() if k not in ("temperature", "top_p", "top_k")}
            generation.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
            # Greedy decoding returns one sequence per input: give it each prompt G times.
            prompts, group_size = prompts.repeated(group_size), 1
        output = policy.generate(
            input_ids=prompts.input_ids,
            attention_mask=prompts.attention_mask,
            mm_token_type_ids=prompts.mm_token_type_ids,
            pixel_values=prompts.pixel_values,
            image_grid_thw=prompts.image_grid_thw,
            num_return_sequences=group_size,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **generation,
        )
        completion = output[:, prompts.input_ids.shape[1] :]
        del output
        self.last_stats = {"seconds": time.perf_counter() - start, "steps": float(completion.shape[1])}
        return completion


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


class _StopForward(Exception):
    """Raised by the hook that captures the language model's inputs, to skip the rest of the forward."""


def prompt_inputs(policy: nn.Module, prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """Prompt embeddings `[P, Lp, H]` (image features placed) and M-RoPE positions `[3, P, Lp]`.

    Taken from the policy's own multimodal forward, stopped where it enters the language model: the
    vision tower, placeholder filling and 3D position rules are the training-time code, whatever the
    transformers version.
    """
    model, language_model, _ = text_parts(policy)
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _StopForward

    handle = language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(
            input_ids=prompts.input_ids,
            attention_mask=prompts.attention_mask,
            mm_token_type_ids=prompts.mm_token_type_ids,
            pixel_values=prompts.pixel_values,
            image_grid_thw=prompts.image_grid_thw,
            use_cache=False,
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    embeds, positions = captured["inputs_embeds"], captured.get("position_ids")
    if positions is None:  # text-only prompts: positions count the real tokens
        positions = (prompts.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if positions.ndim == 2:
        positions = positions[None].expand(3, -1, -1)
    if positions.shape[0] == 4:  # some versions prepend the 1D text positions
        positions = positions[1:]
    return embeds, positions


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Mask tokens outside the smallest set whose probability reaches `top_p` (as `generate` does)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False  # keep at least the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


class StaticDecodeEngine(RolloutEngine):
    """Prefill once per prompt, then fixed-shape decode steps (replayed as a CUDA graph on CUDA).

    Args:
        merge: materialise LoRA-merged dense weights for the rollout (`bf16_copy`) or dequantise packed
            weights inside each step (`dequant`).
        cuda_graph: capture the decode step in a CUDA graph when on CUDA (falls back to eager on failure).
        stop_check_every: decode steps between checks whether every sequence has finished (one host sync).
    """

    merge = True

    def __init__(self, cuda_graph: bool = True, stop_check_every: int = 32):
        super().__init__()
        self.cuda_graph = cuda_graph
        self.stop_check_every = stop_check_every
        self.last_logprobs: Tensor | None = (
            None  # [P*G, C] log-probs of the sampled tokens (temperature only)
        )

    @torch.no_grad()
    def generate(self, policy, prompts, group_size, generation, eos_ids, pad_id) -> Tensor:
        sampling = Sampling.from_generation(generation)
        device = prompts.input_ids.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        weights = self.read_weights(policy)
        embeds, positions = prompt_inputs(policy, prompts)
        logits, prompt_cache = prefill(weights, embeds.to(weights.dtype), positions, prompts.attention_mask)
        del embeds

        count, length = prompts.input_ids.shape[0] * group_size, prompts.input_ids.shape[1]
        steps = sampling.max_new_tokens
        capacity = length + steps
        shape = (count, weights.num_kv_heads, capacity, weights.head_dim)
        state = DecodeState(
            keys=[],
            values=[],
            valid=torch.zeros(count, capacity, dtype=torch.bool, device=device),
            tokens=torch.zeros(count, dtype=torch.long, device=device),
            positions=(positions[0, :, -1] + 1).repeat_interleave(group_size),
            column=torch.full((1,), length, dtype=torch.long, device=device),
        )
        for keys, values in prompt_cache:
            for store, source in ((state.keys, keys), (state.values, values)):
                buffer = torch.zeros(shape, dtype=weights.dtype, device=device)
                buffer[:, :, :length] = source.repeat_interleave(group_size, dim=0)
                store.append(buffer)
        del prompt_cache
        state.valid[:, :length] = prompts.attention_mask.bool().repeat_interleave(group_size, dim=0)

        completion = torch.full((count, steps), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(count, steps, device=device)
        done = torch.zeros(count, dtype=torch.bool, device=device)
        step = torch.zeros(1, dtype=torch.long, device=device)
        eos = torch.tensor(eos_ids, device=device)
        min_new = torch.tensor(sampling.min_new_tokens, device=device)

        def choose(next_logits: Tensor) -> None:
            # Everything in place on static tensors: this is the body a CUDA graph replays.
            scaled = next_logits / sampling.temperature if sampling.do_sample else next_logits
            record = torch.log_softmax(scaled, dim=-1)
            penalty = torch.where(step < min_new, float("-inf"), 0.0)
            scaled = scaled.index_add(1, eos, penalty.expand(count, len(eos_ids)))
            if sampling.do_sample and sampling.top_p < 1.0:
                scaled = _top_p_filter(scaled, sampling.top_p)
            if sampling.do_sample:
                noise = torch.empty_like(scaled).exponential_()
                token = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)  # exponential race = multinomial
            else:
                token = scaled.argmax(dim=-1)
            token = torch.where(done, pad_id, token)
            completion.index_copy_(1, step, token[:, None])
            logprobs.index_copy_(1, step, record.gather(1, token[:, None]))
            done.logical_or_(torch.isin(token, eos))
            state.tokens.copy_(token)
            step.add_(1)

        def body() -> None:
            choose(decode_step(weights, state))

        choose(logits.repeat_interleave(group_size, dim=0))
        del logits
        sync()
        decode_start = time.perf_counter()
        graph, taken = None, 1
        while taken < steps:
            if graph is not None:
                graph.replay()
            elif self.cuda_graph and device.type == "cuda" and taken == 2:
                graph = self._capture(body)
                if graph is None:
                    body()
                else:
                    continue  # capturing does not run the step; replay it
            else:
                body()
            taken += 1
            if sampling.min_new_tokens < steps and taken % self.stop_check_every == 0 and bool(done.all()):
                break
        sync()
        end = time.perf_counter()
        self.last_logprobs = logprobs[:, :taken]
        self.last_stats = {
            "seconds": end - start,
            "decode_seconds": end - decode_start,
            "steps": float(taken),
            "cuda_graph": float(graph is not None),
        }
        return completion[:, :taken]

    def read_weights(self, policy: nn.Module) -> DecoderWeights:
        """The policy's current weights in this engine's linear form."""
        return decoder_weights(policy, merge=self.merge)

    @staticmethod
    def _capture(body) -> torch.cuda.CUDAGraph | None:
        """Capture one decode step (warm-up already ran eagerly); None if capture is not possible here."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            return graph
        except Exception as error:  # a kernel that syncs or allocates on the host: stay eager
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", error)
            return None


class Bf16CopyEngine(StaticDecodeEngine):
    """`bf16_copy`: LoRA merged into a dense copy of the language model for the rollout."""

    name = "bf16_copy"
    merge = True


class DequantEngine(StaticDecodeEngine):
    """`dequant`: packed weights dequantised per matrix inside the step, LoRA unmerged."""

    name = "dequant"
    merge = False


class PackedEngine(StaticDecodeEngine):
    """`packed`: as `dequant`, but decode-step matmuls read the 4-bit weights in a fused Triton kernel."""

    name = "packed"
    merge = False

    def __init__(self, cuda_graph: bool = True, stop_check_every: int = 32):
        super().__init__(cuda_graph, stop_check_every)
        reason = environment_unsupported()
        if reason:
            raise ValueError(f"algorithm.rollout_engine=packed cannot run here: {reason}; {PACKED_FIX}")

    def read_weights(self, policy: nn.Module) -> DecoderWeights:
        return with_kernel_layers(super().read_weights(policy))


ROLLOUT_ENGINES: dict[str, type[RolloutEngine]] = {
    engine.name: engine for engine in (HFGenerate, Bf16CopyEngine, DequantEngine, PackedEngine)
}


def build_rollout_engine(name: str) -> RolloutEngine:
    """The engine registered under `name` (the value of `algorithm.rollout_engine`)."""
    if name not in ROLLOUT_ENGINES:
        raise ValueError(
            f"algorithm.rollout_engine='{name}' is not one of {sorted(ROLLOUT_ENGINES)}; "
            "hf is plain generate, bf16_copy the fastest (+2 bytes per LM parameter), dequant the leanest, "
            "packed dequant's memory through a fused 4-bit kernel (CUDA + Triton)"
        )
    return ROLLOUT_ENGINES[name]()
