"""The static engines (`bf16_copy`, `dequant`, `packed`): prefill once per prompt, keep its KV cache once for
its G rows, then fixed-shape decode steps over vrft's own decoder (`vrft.rollout.decoder`), replayed as a
CUDA graph."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from vrft.kernels import decode_sampling
from vrft.rollout.base import RolloutEngine, Sampling, top_p_filter
from vrft.rollout.batch import PromptBatch
from vrft.rollout.decoder import (
    DecoderWeights,
    DecodeState,
    decode_ops,
    decode_step,
    decoder_weights,
    prefill,
    text_parts,
)
from vrft.rollout.stages import FusedDecodeOps

log = logging.getLogger(__name__)


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


def grouped_state(
    weights, prompts: PromptBatch, positions: Tensor, prompt_cache: list, group_size: int, steps: int
) -> DecodeState:
    """The decode state of `P*G` sequences: each prompt's KV cache (`[P, heads, Lp, dim]` per layer, kept as
    the prefill made it, once for its G rows) and static buffers for `steps` generated tokens a row."""
    device = prompts.input_ids.device
    count = prompts.input_ids.shape[0] * group_size
    shape = (count, weights.num_kv_heads, steps, weights.head_dim)
    # zeros, not empty: the torch attention multiplies the unwritten columns by a zero probability
    return DecodeState(
        keys=[torch.zeros(shape, dtype=weights.dtype, device=device) for _ in prompt_cache],
        values=[torch.zeros(shape, dtype=weights.dtype, device=device) for _ in prompt_cache],
        prompt_keys=[keys.contiguous() for keys, _ in prompt_cache],
        prompt_values=[values.contiguous() for _, values in prompt_cache],
        prompt_valid=prompts.attention_mask.bool(),
        tokens=torch.zeros(count, dtype=torch.long, device=device),
        positions=(positions[0, :, -1] + 1).repeat_interleave(group_size),
        column=torch.zeros(1, dtype=torch.long, device=device),
    )


class TokenChooser:
    """Picks each decode step's tokens into static buffers: the body a CUDA graph replays, so everything
    happens in place on tensors allocated once (no host sync, no new shapes).

    With `fused` (the decode step's fused ops run: CUDA with Triton), one kernel does it
    (`vrft.kernels.decode_sampling`), drawing from its own Philox stream seeded once per rollout from
    torch's generator; top-p below 1 keeps the torch ops (their sort).
    """

    def __init__(
        self, state: DecodeState, sampling: Sampling, eos_ids: list[int], pad_id: int, fused: bool = False
    ):
        count, device = state.tokens.shape[0], state.tokens.device
        self.fused = fused and not (sampling.do_sample and sampling.top_p < 1.0)
        # the fused kernel's draw seed, from torch's generator only where it draws (not for greedy decoding)
        self.seed: Tensor | None = None
        if self.fused and sampling.do_sample:
            self.seed = torch.randint(2**62, (1,), device=device)
        elif self.fused:
            self.seed = torch.zeros(1, dtype=torch.long, device=device)
        self.state, self.sampling, self.pad_id, self.num_eos = state, sampling, pad_id, len(eos_ids)
        self.completion = torch.full(
            (count, sampling.max_new_tokens), pad_id, dtype=torch.long, device=device
        )
        self.logprobs = torch.zeros(count, sampling.max_new_tokens, device=device)  # [P*G, C] at temperature
        self.done = torch.zeros(count, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos_ids, device=device)
        self.min_new = torch.tensor(sampling.min_new_tokens, device=device)
        self.suppress: Tensor | None = None  # [V] -inf at never-sampled ids; made by the first (eager) call

    def _suppression(self, logits: Tensor) -> Tensor:
        if self.suppress is None:
            vocab = logits.shape[-1]
            ids = torch.tensor([i for i in self.sampling.suppress_tokens if i < vocab], dtype=torch.long)
            self.suppress = torch.zeros(vocab, device=logits.device)
            self.suppress[ids.to(logits.device)] = float("-inf")
        return self.suppress

    def choose(self, next_logits: Tensor) -> None:
        """Sample (or argmax) the next token of every row from `[P*G, V]` logits and record it."""
        sampling, count = self.sampling, self.completion.shape[0]
        if self.fused:
            decode_sampling.choose(
                next_logits, self._suppression(next_logits), self.eos, self.seed, self.step, self.min_new,
                self.done, self.state.tokens, self.completion, self.logprobs, sampling.temperature, self.pad_id,
                sampling.do_sample,
            )  # fmt: skip
            return
        scaled = next_logits / sampling.temperature if sampling.do_sample else next_logits
        record = torch.log_softmax(
            scaled, dim=-1
        )  # the policy's distribution, as the training forward sees it
        scaled = scaled + self._suppression(scaled)
        penalty = torch.where(self.step < self.min_new, float("-inf"), 0.0)
        scaled = scaled.index_add(1, self.eos, penalty.expand(count, self.num_eos))
        if sampling.do_sample and sampling.top_p < 1.0:
            scaled = top_p_filter(scaled, sampling.top_p)
        if sampling.do_sample:
            noise = torch.empty_like(scaled).exponential_()
            token = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)  # exponential race = multinomial
        else:
            token = scaled.argmax(dim=-1)
        token = torch.where(self.done, self.pad_id, token)
        self.completion.index_copy_(1, self.step, token[:, None])
        self.logprobs.index_copy_(1, self.step, record.gather(1, token[:, None]))
        self.done.logical_or_(torch.isin(token, self.eos))
        self.state.tokens.copy_(token)
        self.step.add_(1)


class StaticDecodeEngine(RolloutEngine):
    """Prefill once per prompt, then fixed-shape decode steps (replayed as a CUDA graph on CUDA).

    Args:
        merge: materialise LoRA-merged dense weights for the rollout (`bf16_copy`) or dequantise packed
            weights inside each step (`dequant`).
        cuda_graph: capture the decode step in a CUDA graph when on CUDA (falls back to eager on failure).
        stop_check_every: decode steps between checks whether every sequence has finished (one host sync).
        fused_decode: the decode step's element-wise stages and attention in Triton kernels where they run
            (`vrft.rollout.decoder.decode_ops`); False keeps torch's ops and SDPA (benchmarks compare the two).
    """

    merge = True

    def __init__(self, cuda_graph: bool = True, stop_check_every: int = 32, fused_decode: bool = True):
        super().__init__()
        self.cuda_graph = cuda_graph
        self.stop_check_every = stop_check_every
        self.fused_decode = fused_decode

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
        state = grouped_state(weights, prompts, positions, prompt_cache, group_size, sampling.max_new_tokens)
        del prompt_cache
        ops = decode_ops(weights, device, self.fused_decode)
        tokens = TokenChooser(state, sampling, eos_ids, pad_id, fused=isinstance(ops, FusedDecodeOps))
        tokens.choose(logits.repeat_interleave(group_size, dim=0))
        del logits
        sync()
        decode_start = time.perf_counter()
        taken, graph = self._decode(lambda: tokens.choose(decode_step(weights, state, ops)), tokens, sampling)
        sync()
        end = time.perf_counter()
        self.last_logprobs = tokens.logprobs[:, :taken]
        self.last_stats = {
            "seconds": end - start,
            "decode_seconds": end - decode_start,
            "steps": float(taken),
            "cuda_graph": float(graph is not None),
        }
        return tokens.completion[:, :taken]

    def _decode(self, body, tokens: TokenChooser, sampling: Sampling) -> tuple[int, object]:
        """Run decode steps until `max_new_tokens` or every sequence stopped; returns (steps, graph)."""
        steps, device = sampling.max_new_tokens, tokens.completion.device
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
            if (
                sampling.min_new_tokens < steps
                and taken % self.stop_check_every == 0
                and bool(tokens.done.all())
            ):
                break
        return taken, graph

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
