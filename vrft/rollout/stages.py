"""The stages of a decode step between its matmuls: RMSNorm with the residual add before it, rotary
embedding with the KV-cache writes, SiLU x up, and attention over the cache.

`DecodeOps` computes them with torch ops (the reference, and what runs on the CPU); `FusedDecodeOps` with
one Triton launch each (`vrft.kernels.decode_fusions`, `vrft.kernels.decode_attention`): ~25 small kernels
per decoder layer and decode step become four. `vrft.rollout.decoder.decode_ops` picks one for a decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from vrft.kernels import decode_fusions
from vrft.kernels.decode_attention import decode_attention


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen2's RMSNorm: variance in fp32, scale applied after casting back (as the policy does).

    `F.rms_norm` rather than the policy's spelled-out ops (pow, mean, add, rsqrt, mul): the same fp32 result
    (bit-equal on CPU, tests/rollout), and on CUDA one fused kernel instead of five: 0.5-0.65 ms less GPU
    time per 7B decode step, 57 norms (bench/rollout/results.md).
    """
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """`(-x[..., hd/2:], x[..., :hd/2])` along the last axis: RoPE's rotation by 90 degrees."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of `x [B, heads, T, hd]` with `cos`, `sin` `[B, T, hd]` (each product rounded to
    x's dtype, then their sum, as the policy computes it)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DecodeOps:
    """The element-wise stages and the attention of a decode step, as torch ops: the reference
    `FusedDecodeOps` computes."""

    def add_rms_norm(
        self, hidden: Tensor, delta: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """`(hidden + delta, rms_norm(hidden + delta))`; without `delta`, `(hidden, rms_norm(hidden))`."""
        if delta is not None:
            hidden = hidden + delta
        return hidden, rms_norm(hidden, weight, eps)

    def rope_into_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: Tensor,
        values: Tensor,
        column: Tensor,
    ) -> Tensor:
        """q, k, v `[N, 1, heads * hd]` -> rotated q `[N, heads, 1, hd]`; rotated k and v written to the
        caches `[N, kv_heads, Lmax, hd]` at `column`."""
        count, head_dim = q.shape[0], keys.shape[-1]

        def heads(x: Tensor) -> Tensor:
            return x.view(count, 1, -1, head_dim).transpose(1, 2)

        keys.index_copy_(2, column, rope(heads(k), cos, sin))
        values.index_copy_(2, column, heads(v))
        return rope(heads(q), cos, sin)

    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        """`silu(gate) * up`, `[..., intermediate]` each."""
        return F.silu(gate) * up

    def attention(self, state, scale: float) -> Callable[[Tensor, int], Tensor]:
        """This step's attention: `(q [N, kv_heads, groups, hd], layer) -> [N, kv_heads, groups, hd]`, over
        `state`'s (a `vrft.rollout.decoder.DecodeState`) prompt columns that its `prompt_valid` marks, each
        prompt's shared by its G rows, and each row's own generated columns up to `state.column` (the fused
        attention reads no later one). What the static engines run on the CPU, the fused ops' fallback and
        the benchmarks' torch decode step.

        A prompt's G rows query its keys and values as one batch of G x groups queries, so its cache is read
        once, not copied for each row; each row's own columns are read as a batch of its groups queries. One
        softmax spans both parts: scores, probabilities and sums in fp32, the output rounded once. Not SDPA:
        one call needs a key tensor per row (the prompt's repeated G times, the copy this avoids), and two
        calls cannot be merged, as SDPA returns no log-sum-exp."""
        prompts, kv_heads, prompt_columns, _ = state.prompt_keys[0].shape
        count = state.keys[0].shape[0]
        group = count // prompts
        mask: Tensor | None = None  # additive, [N, 1, 1, prompt and generated columns]

        def per_prompt(x: Tensor) -> Tensor:  # [N, kv, groups, c] -> [P, kv, G groups, c]
            x = x.reshape(prompts, group, kv_heads, -1, x.shape[-1]).transpose(1, 2)
            return x.reshape(prompts, kv_heads, -1, x.shape[-1])

        def per_row(x: Tensor) -> Tensor:  # the inverse
            x = x.reshape(prompts, kv_heads, group, -1, x.shape[-1]).transpose(1, 2)
            return x.reshape(count, kv_heads, -1, x.shape[-1])

        def attend(q: Tensor, layer: int) -> Tensor:
            nonlocal mask
            keys, values = state.keys[layer], state.values[layer]
            # made once a step, at the first call (the fused ops' fallback launches nothing unless it runs)
            if mask is None:
                generated = torch.arange(keys.shape[2], device=q.device) <= state.column
                valid = torch.cat(
                    (state.prompt_valid.repeat_interleave(group, dim=0), generated.expand(count, -1)), dim=1
                )
                mask = torch.zeros(valid.shape, device=q.device).masked_fill_(~valid, float("-inf"))
                mask = mask[:, None, None, :]
            query = q.float() * scale
            scores = torch.cat(
                (
                    per_row(per_prompt(query) @ state.prompt_keys[layer].float().transpose(-1, -2)),
                    query @ keys.float().transpose(-1, -2),
                ),
                dim=-1,
            )
            probs = (scores + mask).softmax(dim=-1)
            out = per_row(per_prompt(probs[..., :prompt_columns]) @ state.prompt_values[layer].float())
            return out.add_(probs[..., prompt_columns:] @ values.float()).to(q.dtype)

        return attend


class FusedDecodeOps(DecodeOps):
    """The same stages in one Triton launch each (`vrft.kernels.decode_fusions` says why and how exact), the
    attention split along the cache (`vrft.kernels.decode_attention`); mixed dtypes, which torch would
    promote, go to the torch ops."""

    def add_rms_norm(
        self, hidden: Tensor, delta: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        if delta is not None and delta.dtype != hidden.dtype:
            return super().add_rms_norm(hidden, delta, weight, eps)
        return decode_fusions.add_rms_norm(hidden, delta, weight, eps)

    def rope_into_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: Tensor,
        values: Tensor,
        column: Tensor,
    ) -> Tensor:
        if len({q.dtype, k.dtype, v.dtype, cos.dtype, keys.dtype}) > 1:
            return super().rope_into_cache(q, k, v, cos, sin, keys, values, column)
        return decode_fusions.rope_into_cache(q, k, v, cos, sin, keys, values, column)

    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        if gate.dtype != up.dtype:
            return super().silu_mul(gate, up)
        return decode_fusions.silu_mul(gate, up)

    def attention(self, state, scale: float) -> Callable[[Tensor, int], Tensor]:
        fallback = super().attention(state, scale)

        def attend(q: Tensor, layer: int) -> Tensor:
            if q.dtype != state.keys[layer].dtype or not q.is_contiguous():
                return fallback(q, layer)
            return decode_attention(
                q,
                state.keys[layer],
                state.values[layer],
                state.column,
                scale,
                state.prompt_keys[layer],
                state.prompt_values[layer],
                state.prompt_valid,
            )

        return attend
