"""A static-shape Qwen2-VL / Qwen2.5-VL text decoder for rollouts: preallocated KV cache, no host syncs.

It computes what the policy's language model computes (same RMSNorm, multimodal RoPE, grouped-query
attention, SwiGLU MLP and `lm_head`), but with fixed tensor shapes and in-place state updates, so that one
decode step can be captured in a CUDA graph and replayed: the per-step cost becomes the GPU's work, not
Python and kernel-launch overhead. Weights come from `vrft.rollout.weights` (merged or packed). On CUDA the
step's element-wise stages and its attention run as a few Triton kernels, not as the ~25 small torch
kernels per layer they replace (`vrft.rollout.stages`).

Prompt embeddings and 3D positions (image features, M-RoPE) are taken from the policy itself, so the
vision tower and the position rules are never re-implemented here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vrft.kernels import decode_fusions
from vrft.kernels.decode_attention import unsupported as attention_unsupported
from vrft.models.policy import base_model
from vrft.rollout.stages import DecodeOps, FusedDecodeOps, rms_norm, rope
from vrft.rollout.weights import LinearOp, linear_op

log = logging.getLogger(__name__)


@dataclass
class LayerWeights:
    """One decoder layer."""

    q: LinearOp
    k: LinearOp
    v: LinearOp
    o: LinearOp
    gate: LinearOp
    up: LinearOp
    down: LinearOp
    input_norm: Tensor  # [H]
    post_norm: Tensor  # [H]


@dataclass
class DecoderWeights:
    """Everything the decoder reads, taken from the policy for one rollout."""

    embed: Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: Tensor  # [H]
    lm_head: LinearOp
    eps: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: Tensor  # [head_dim / 2] fp32
    mrope_section: list[int]
    dtype: torch.dtype
    rope_scaling: float = 1.0  # the rotary module's attention_scaling (1 for default RoPE)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def text_parts(policy: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """`(multimodal model, language model, lm_head)` of a (peft-wrapped) Qwen2-VL / Qwen2.5-VL policy."""
    model = base_model(policy)
    return model.model, model.model.language_model, model.lm_head


def decoder_weights(policy: nn.Module, merge: bool) -> DecoderWeights:
    """Read the policy's current weights (adapter included) for the decoder; `merge` picks the linear form."""
    _, language_model, lm_head = text_parts(policy)
    embed = language_model.embed_tokens.weight
    dtype = embed.dtype
    layers = []
    for layer in language_model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append(
            LayerWeights(
                *(linear_op(getattr(attention, f"{n}_proj"), merge, dtype) for n in "qkvo"),
                *(linear_op(getattr(mlp, f"{n}_proj"), merge, dtype) for n in ("gate", "up", "down")),
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
            )
        )
    config = language_model.config
    rotary = language_model.rotary_emb
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    section = getattr(rotary, "mrope_section", None) or rope.get("mrope_section")
    return DecoderWeights(
        embed=embed,
        layers=layers,
        norm=language_model.norm.weight,
        lm_head=linear_op(lm_head, merge, dtype),
        eps=language_model.norm.variance_epsilon,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        inv_freq=rotary.inv_freq.float(),
        mrope_section=list(section),
        dtype=dtype,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


def mrope_cos_sin(weights: DecoderWeights, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Cos/sin `[B, T, head_dim]` for 3D positions `[3, B, T]` (temporal, height, width sections)."""
    freqs = position_ids[..., None].float() * weights.inv_freq  # [3, B, T, hd/2]
    chunks = freqs.split(weights.mrope_section, dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    return _cos_sin(weights, freqs)


def _cos_sin(weights: DecoderWeights, freqs: Tensor) -> tuple[Tensor, Tensor]:
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = weights.rope_scaling
    return (emb.cos() * scale).to(weights.dtype), (emb.sin() * scale).to(weights.dtype)


def text_cos_sin(weights: DecoderWeights, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Cos/sin `[N, 1, head_dim]` for text tokens at 1D positions `[N]` (all three M-RoPE sections agree)."""
    return _cos_sin(weights, positions[:, None, None].float() * weights.inv_freq)


def _mlp(layer: LayerWeights, x: Tensor) -> Tensor:
    return layer.down(F.silu(layer.gate(x)) * layer.up(x))


def decode_ops(weights: DecoderWeights, device: torch.device, fused: bool = True) -> DecodeOps:
    """The fused decode ops where they run (CUDA with Triton), else torch's; says why at debug level."""
    if fused:
        hidden_size = weights.num_heads * weights.head_dim
        reason = decode_fusions.unsupported(
            device, weights.dtype, hidden_size, weights.head_dim
        ) or attention_unsupported(weights.head_dim)
        if reason is None:
            return FusedDecodeOps()
        log.debug("decode step with torch's element-wise ops: %s", reason)
    return DecodeOps()


def _qkv(weights: DecoderWeights, layer: LayerWeights, x: Tensor, cos: Tensor, sin: Tensor):
    batch, length, _ = x.shape
    hd = weights.head_dim
    q = layer.q(x).view(batch, length, -1, hd).transpose(1, 2)
    k = layer.k(x).view(batch, length, -1, hd).transpose(1, 2)
    v = layer.v(x).view(batch, length, -1, hd).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin), v


@torch.no_grad()
def prefill(
    weights: DecoderWeights, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Run the prompt through the decoder.

    Args:
        embeds: `[P, Lp, H]` prompt embeddings (image features already placed), left-padded.
        position_ids: `[3, P, Lp]` M-RoPE positions.
        attention_mask: `[P, Lp]` 1 on real tokens.
    Returns:
        logits `[P, V]` fp32 of the last position, and per layer `(keys, values)` `[P, kv_heads, Lp, hd]`.
    """
    length = embeds.shape[1]
    cos, sin = mrope_cos_sin(weights, position_ids)
    causal = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()
    # Padding queries see only themselves, so no softmax row is empty (their outputs are never used).
    eye = torch.eye(length, dtype=torch.bool, device=embeds.device)
    mask = (causal & attention_mask.bool()[:, None, :]) | eye  # [P, Lp, Lp]
    groups = weights.num_heads // weights.num_kv_heads
    hidden = embeds
    cache = []
    for layer in weights.layers:
        x = rms_norm(hidden, layer.input_norm, weights.eps)
        q, k, v = _qkv(weights, layer, x, cos, sin)
        cache.append((k, v))
        out = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(groups, dim=1),
            v.repeat_interleave(groups, dim=1),
            attn_mask=mask[:, None],
            scale=1 / math.sqrt(weights.head_dim),
        )
        hidden = hidden + layer.o(out.transpose(1, 2).reshape(*hidden.shape[:2], -1))
        hidden = hidden + _mlp(layer, rms_norm(hidden, layer.post_norm, weights.eps))
    last = rms_norm(hidden[:, -1], weights.norm, weights.eps)
    return weights.lm_head(last).float(), cache


@dataclass
class DecodeState:
    """Static buffers one decode step reads and updates in place (what a CUDA graph replays over).

    A prompt's keys and values are kept once for the G sequences sampled from it (rows `p G .. p G + G - 1`
    of the `N = P G`), as the prefill made them; each sequence's own cache holds only its generated tokens.
    """

    keys: list[Tensor]  # per layer [N, kv_heads, steps, hd]: the generated tokens' keys
    values: list[Tensor]  # per layer [N, kv_heads, steps, hd]
    prompt_keys: list[Tensor]  # per layer [P, kv_heads, Lp, hd]
    prompt_values: list[Tensor]  # per layer [P, kv_heads, Lp, hd]
    prompt_valid: Tensor  # [P, Lp] bool: the prompt's real tokens (left padding off)
    tokens: Tensor  # [N] the token fed to the next step
    positions: Tensor  # [N] its M-RoPE (text) position
    column: Tensor  # [1] long: the generated-cache column it is written to


@torch.no_grad()
def decode_step(weights: DecoderWeights, state: DecodeState, ops: DecodeOps | None = None) -> Tensor:
    """Feed `state.tokens`, write their keys/values at generated column `state.column`; returns next-token
    logits `[N, V]` fp32.

    Shapes are fixed and the cache index is a device tensor, so the step is capturable in a CUDA graph.
    `ops` (default: torch's) computes the element-wise stages and the attention; each residual add is done
    with the norm after it.
    """
    ops = ops or DecodeOps()
    hidden = F.embedding(state.tokens[:, None], weights.embed)  # [N, 1, H]
    count = hidden.shape[0]
    cos, sin = text_cos_sin(weights, state.positions)
    groups = weights.num_heads // weights.num_kv_heads
    attend = ops.attention(state, 1 / math.sqrt(weights.head_dim))
    after_mlp = [layer.input_norm for layer in weights.layers[1:]] + [weights.norm]  # the norm that follows
    hidden, x = ops.add_rms_norm(hidden, None, weights.layers[0].input_norm, weights.eps)
    for index, layer in enumerate(weights.layers):
        q = ops.rope_into_cache(
            layer.q(x), layer.k(x), layer.v(x), cos, sin, state.keys[index], state.values[index], state.column
        )
        # Grouped-query attention without copying the cache: the query heads that share a KV head are
        # folded into the query-length axis of that head ([N, kv_heads, groups, hd]).
        out = attend(q.reshape(count, weights.num_kv_heads, groups, weights.head_dim), index)
        hidden, x = ops.add_rms_norm(hidden, layer.o(out.reshape(count, 1, -1)), layer.post_norm, weights.eps)
        gated = layer.gate.silu_mul_with(layer.up, x)
        if gated is None:
            gated = ops.silu_mul(layer.gate(x), layer.up(x))
        delta = layer.down(gated)
        hidden, x = ops.add_rms_norm(hidden, delta, after_mlp[index], weights.eps)
    state.positions.add_(1)
    state.column.add_(1)
    return weights.lm_head(x[:, 0]).float()
