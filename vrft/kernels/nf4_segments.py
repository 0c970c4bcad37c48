"""Several 4-bit weights that read one input in one launch of `nf4_matmul`'s kernel: the segment table.

Why: the projections of a decoder layer that read one input (q/k/v, gate/up) were separate launches of a
few hundred programs; k and v of a 7B layer are 512 rows each, a launch's start and its split-K reduction
for ~1% of the layer's bytes (9 us each against 12 for q, bench/rollout/results.md). Side by side along the
grid's first axis their programs fill the GPU together: q/k/v took 18.4 us in one launch against 32.8 in
three. Each program finds its weight in a small int64 table built once per set of weights (`segments`);
the kernel reads it through `segment`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the table is still built (and tested); the kernel needs CUDA
    triton = None

# One row of a segment table (`segments`), int64: a weight's out_features, then the addresses of its packed
# codes, absmax, nested absmax, nested code, offset, bias and LoRA B, then its LoRA rank and the first
# column of its share of the shared `x A^T`. A bias or LoRA B the weights do not have is 0; without double
# quantisation the nested entries repeat the absmax (never read).
SEGMENT_FIELDS = (
    "out_features", "packed", "absmax", "absmax2", "code2", "offset", "bias", "lora_b", "lora_rank", "lora_column"
)  # fmt: skip


if triton is not None:
    _ROW = tl.constexpr(len(SEGMENT_FIELDS))
    _PACKED, _ABSMAX, _ABSMAX2, _CODE2, _OFFSET, _BIAS, _LORA_B, _LORA_RANK, _LORA_COLUMN = (
        tl.constexpr(SEGMENT_FIELDS.index(name)) for name in SEGMENT_FIELDS[1:]
    )  # jit code reads constexpr globals only; out_features is entry 0

    @triton.jit
    def _address(row, FIELD: tl.constexpr, like):
        """Entry `FIELD` of a segment row as a pointer of `like`'s type."""
        return tl.load(row + FIELD).to(like.dtype)

    @triton.jit
    def segment(
        table, pid_n, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, lora_in_ptr,
        lora_b_ptr, y_ptr, SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """What output tile `pid_n` of a `segments` launch reads and writes: its weight's pointers (typed as
        the arguments, which are the first weight's), LoRA rank, out_features and tile index within that
        weight; `lora_in_ptr` moved to the weight's columns of `x A^T` and `y_ptr` to its output columns."""
        index = 0
        first_tile = 0
        first_column = 0
        tiles = 0
        columns = 0
        for position in tl.static_range(SEGMENTS):  # the weights' tiles lie side by side along grid axis 0
            count = tl.load(table + position * _ROW)
            later = pid_n >= tiles
            index = tl.where(later, position, index)
            first_tile = tl.where(later, tiles, first_tile)
            first_column = tl.where(later, columns, first_column)
            tiles += tl.cdiv(count, BLOCK_N)
            columns += count
        row = table + index * _ROW
        # `segments` checked that every address is 16-byte aligned and every out_features a multiple of 8:
        # the hints keep the packed codes' loads and the output's stores as wide as the one-weight kernel's.
        # The codes' pointer is moved by an element offset from the argument's: a hint on the pointer loaded
        # from the table itself is lost (its loads compiled to 4-byte copies instead of 8, sm_90 PTX).
        ELEMENT: tl.constexpr = packed_ptr.dtype.element_ty.primitive_bitwidth // 8
        offset = tl.load(row + _PACKED) - packed_ptr.to(tl.int64)
        packed_ptr += tl.multiple_of(offset // ELEMENT, 16 // ELEMENT)
        y_ptr = y_ptr + tl.multiple_of(first_column, 8)
        return (
            packed_ptr, _address(row, _ABSMAX, absmax_ptr), _address(row, _ABSMAX2, absmax2_ptr),
            _address(row, _CODE2, code2_ptr), _address(row, _OFFSET, offset_ptr), _address(row, _BIAS, bias_ptr),
            lora_in_ptr + tl.load(row + _LORA_COLUMN), _address(row, _LORA_B, lora_b_ptr), y_ptr,
            tl.load(row + _LORA_RANK).to(tl.int32), tl.load(row).to(tl.int32), pid_n - first_tile.to(tl.int32),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Segments:
    """Weights that read the same input, multiplied in one launch (`nf4_matmul.matmul_4bit_segments`)."""

    table: Tensor  # [weights, len(SEGMENT_FIELDS)] int64 on the weights' device
    out_features: tuple[int, ...]
    first: tuple  # (packed, quant_state, bias, lora_b) of the first weight: the kernel's argument types
    lora_rank: int  # the largest
    held: tuple  # every tensor the table points at, kept alive with it


def segments_unsupported(weights: list[tuple]) -> str | None:
    """Why `weights` (`(packed, quant_state, bias, lora_b, lora_column)` each) cannot share one launch."""
    packed, state, bias, lora_b, _ = weights[0]
    kind = (state.quant_type, state.blocksize, state.dtype, state.shape[1], state.nested)
    for other, other_state, other_bias, other_b, _ in weights[1:]:
        other_kind = (other_state.quant_type, other_state.blocksize, other_state.dtype, other_state.shape[1],
                      other_state.nested)  # fmt: skip
        if other_kind != kind:
            return f"the weights' layouts differ: {other_kind} against {kind}"
        if other.device != packed.device:
            return "the weights are on different devices"
        if (other_bias is None) != (bias is None) or (other_b is None) != (lora_b is None):
            return "some weights have a bias or a LoRA adapter and others not"
        if (
            lora_b is not None
            and other_b.dtype != lora_b.dtype
            or bias is not None
            and other_bias.dtype != bias.dtype
        ):
            return "the weights' biases or LoRA B matrices have different dtypes"
    for packed, state, bias, lora_b, _ in weights:
        if state.nested and state.state2.blocksize != weights[0][1].state2.blocksize:
            return "the double-quantised absmax blocksizes differ"
        if state.shape[0] % 8:
            return f"out_features {state.shape[0]} is not a multiple of 8 (the outputs' alignment)"
        if lora_b is not None and (lora_b.stride(1) != 1 or lora_b.stride(0) != lora_b.shape[1]):
            return "a LoRA B matrix is not contiguous"
        pointers = [packed, state.absmax, bias, lora_b] + ([state.state2.absmax] if state.nested else [])
        if any(t is not None and t.data_ptr() % 16 for t in pointers):
            return "a weight's storage is not 16-byte aligned"
    return None


def segments(weights: list[tuple]) -> Segments:
    """The table of `weights` (`(packed, quant_state, bias, lora_b, lora_column)` each: `lora_column` is the
    first column of its share of the `x A^T` the launch is given) for `nf4_matmul.matmul_4bit_segments`.

    Built once per set of weights (it holds their addresses); `segments_unsupported` must be None.
    """
    reason = segments_unsupported(weights)
    if reason is not None:
        raise ValueError(f"these weights cannot share one launch: {reason}")
    rows, held = [], []
    for packed, state, bias, lora_b, lora_column in weights:
        nested = state.state2 if state.nested else None
        parts = {
            "out_features": state.shape[0],
            "packed": packed,
            "absmax": state.absmax,
            "absmax2": nested.absmax if nested else state.absmax,
            "code2": nested.code if nested else state.absmax,
            "offset": state.offset if nested else state.absmax,
            "bias": bias,
            "lora_b": lora_b,
            "lora_rank": 0 if lora_b is None else lora_b.shape[1],
            "lora_column": lora_column or 0,
        }
        held += [value for value in parts.values() if isinstance(value, Tensor)]
        rows.append([value.data_ptr() if isinstance(value, Tensor) else (value or 0) for value in
                     (parts[field] for field in SEGMENT_FIELDS)])  # fmt: skip
    packed, state, bias, lora_b, _ = weights[0]
    return Segments(
        table=torch.tensor(rows, dtype=torch.int64, device=packed.device),
        out_features=tuple(w[1].shape[0] for w in weights),
        first=(packed, state, bias, lora_b),
        lora_rank=max(0 if w[3] is None else w[3].shape[1] for w in weights),
        held=tuple(held),
    )
