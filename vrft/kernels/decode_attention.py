"""Attention of one decode token per sequence over its prompt's keys and values and its own, split along the
cache (flash decoding), each prompt's keys and values read once for its G sequences.

Why hand-written: at decode, SDPA's fused kernels (cuDNN on the H200) run one program per (sequence, KV
head) query tile over the whole cache and took 28 us per 7B layer at 16 sequences, 0.8 ms of a decode step
(bench/rollout/results.md). And a GRPO rollout decodes G completions of one prompt side by side: their
caches begin with the same prompt, so the static engines keep each prompt's keys and values once
(`vrft.rollout.decoder.DecodeState`) rather than G copies, and this kernel reads them once for all G: a tile
is (prompt, KV head, as many of its sequences as keep the tile within `QUERY_ROWS` query rows), every query
head of those sequences side by side in one tensor-core product with each block of the prompt's keys. The generated columns differ per
sequence and are read by programs of one sequence each. Both kinds of program work on slices of their
columns side by side; a generated slice stops at the step's column (read on the device, so the launch is
the same in every CUDA-graph replay): the columns not yet written are never read. The last program of a
tile to arrive (an atomic counter it resets) merges the slices' softmax partials, as
`nf4_epilogue.store_output` adds up K slices.

Numerics: scores and the softmax in fp32; the probabilities are rounded to the cache's dtype for the
tensor-core product with the values, as flash attention does; the output is rounded once. fp32 caches (the
tiny test model) multiply in full fp32, not TF32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrft.kernels.launch_order import launch_options
from vrft.kernels.workspace import multiprocessors, split_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder's SDPA runs instead
    triton = None

# Measured at the 7B shape, 16 sequences (bench/rollout/attention_sweep.py): with one cache per sequence
# (results/tuning_call) 64 columns per step, 8 warps and 4 slices per (sequence, KV head) took 14.0-14.6 us
# against SDPA's 21.8-22.2 (4 warps 15.0-15.8, 32 columns 14.8-15.3, 128 columns 19.8-21.4); with the
# prompt's cache shared (results/shared_prompt_call/ab/new) 64 columns took 11.9-12.3 us with 8 or 4 warps,
# 32 columns 12.7-13.0, 128 columns 12.4-12.8.
BLOCK_L = 64  # cache columns per loop step
NUM_WARPS = 8
PROGRAMS_PER_SM = 2  # the slices aim at this many programs per multiprocessor
QUERY_ROWS = 64  # the most query rows (sequences x query heads per KV head) a tile's prompt programs take
# The slices, from bench/rollout/attention_sweep.py at the 7B shape, 2 prompts of 606 columns x G = 8, 128
# generated columns (results/shared_prompt_call/, H100): (prompt, generated) slices (8, 1) 11.9-12.3 us a
# layer, (4, 1) 12.7-13.3, (8, 2) 14.7-16.0, (4, 2) 14.6-14.9, (16, 2) 15.8-15.9 (the old kernel, one cache
# a sequence with the prompt copied into each: 18.2-19.0). A second slice of a sequence's generated columns
# cost more than it saved at 2 blocks, so a generated slice takes up to GENERATED_BLOCKS.
MAX_PROMPT_SLICES = 8
GENERATED_BLOCKS = 8


def unsupported(head_dim: int) -> str | None:
    """Why the kernel cannot serve heads of `head_dim` (None: it can); the tensor-core dots need >= 16."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    return None


if triton is not None:
    from vrft.kernels.launch_order import wait_for_inputs

    @triton.jit
    def _attend(q, keys_ptr, values_ptr, valid_ptr, cache, start, stop, best, total, acc, scale, stride_cl,
                BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
        """The running softmax `(best, total, acc)` of queries `q [rows, hd]` taken over the cache columns
        `start .. stop` at `cache` (+ column x `stride_cl`); with MASKED, only those `valid_ptr` marks."""
        dim = tl.arange(0, HEAD_DIM)
        for first in range(start, stop, BLOCK_L):
            column = first + tl.arange(0, BLOCK_L)
            inside = column < stop
            usable = inside
            if MASKED:
                usable = inside & (tl.load(valid_ptr + column, mask=inside, other=0) != 0)
            slots = cache + column[:, None] * stride_cl + dim[None, :]
            keys = tl.load(keys_ptr + slots, mask=inside[:, None], other=0.0)
            score = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
            score = tl.where(usable[None, :], score * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(score, 1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing usable yet: no inf - inf
            weight = tl.exp(score - shift[:, None])
            decay = tl.exp(best - shift)
            values = tl.load(values_ptr + slots, mask=inside[:, None], other=0.0)
            total = total * decay + tl.sum(weight, 1)
            acc = acc * decay[:, None] + tl.dot(weight.to(values.dtype), values, input_precision=PRECISION)
            best = new_best
        return best, total, acc

    @triton.jit
    def _save_partial(partials, stats, rows, mask, best, total, acc, HEAD_DIM: tl.constexpr,
                      BLOCK_Q: tl.constexpr):  # fmt: skip
        """A slice's partial softmax for query rows `rows` (of the tile's BLOCK_Q) into its slot."""
        dim = tl.arange(0, HEAD_DIM)
        tl.store(partials + rows[:, None] * HEAD_DIM + dim[None, :], acc, mask=mask[:, None])
        tl.store(stats + rows, best, mask=mask)
        tl.store(stats + BLOCK_Q + rows, total, mask=mask)

    @triton.jit
    def _prompt_slice(q_ptr, keys_ptr, values_ptr, valid_ptr, partials, stats, first, held, prompt, head, groups,
                      start, stop, scale, stride_qn, stride_qh, stride_pn, stride_ph, stride_pl,
                      BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PRECISION: tl.constexpr):  # fmt: skip
        """Prompt columns `start .. stop` for every query row of the tile (sequence x groups + query head)."""
        dim = tl.arange(0, HEAD_DIM)
        rows = tl.arange(0, BLOCK_Q)
        mask = rows < held * groups
        queries = (first + rows // groups) * stride_qn + head * stride_qh + (rows % groups) * HEAD_DIM
        q = tl.load(q_ptr + queries[:, None] + dim[None, :], mask=mask[:, None], other=0.0)
        best, total, acc = _attend(
            q, keys_ptr, values_ptr, valid_ptr, prompt.to(tl.int64) * stride_pn + head * stride_ph, start, stop,
            tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_Q,), dtype=tl.float32),
            tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32), scale, stride_pl, BLOCK_L, HEAD_DIM, PRECISION, True,
        )  # fmt: skip
        _save_partial(partials, stats, rows, mask, best, total, acc, HEAD_DIM, BLOCK_Q)

    @triton.jit
    def _generated_slice(q_ptr, keys_ptr, values_ptr, partials, stats, row, own, head, groups, start, stop, scale,
                         stride_qn, stride_qh, stride_cn, stride_ch, stride_cl, BLOCK_Q: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PRECISION: tl.constexpr):  # fmt: skip
        """Generated columns `start .. stop` of sequence `row` (the tile's `own`-th) for its query heads."""
        dim = tl.arange(0, HEAD_DIM)
        heads = tl.arange(0, BLOCK_G)
        mask = heads < groups
        q = tl.load(q_ptr + row * stride_qn + head * stride_qh + heads[:, None] * HEAD_DIM + dim[None, :],
                    mask=mask[:, None], other=0.0)  # fmt: skip
        best, total, acc = _attend(
            q, keys_ptr, values_ptr, keys_ptr, row.to(tl.int64) * stride_cn + head * stride_ch, start, stop,
            tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_G,), dtype=tl.float32),
            tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32), scale, stride_cl, BLOCK_L, HEAD_DIM, PRECISION, False,
        )  # fmt: skip
        _save_partial(partials, stats, own * groups + heads, mask, best, total, acc, HEAD_DIM, BLOCK_Q)

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, keys_ptr, values_ptr, prompt_keys_ptr, prompt_values_ptr, prompt_valid_ptr, column_ptr,
        out_ptr, partial_ptr, stats_ptr, counter_ptr, kv_heads, groups, group_size, chunks, sequences,
        prompt_columns, prompt_per_slice, generated_per_slice, prompt_slices, slots, scale, stride_qn,
        stride_qh, stride_on, stride_oh, stride_cn, stride_ch, stride_cl, stride_pn, stride_ph, stride_pl,
        stride_valid, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        tile, program = tl.program_id(0), tl.program_id(1)
        head = tile % kv_heads
        chunk = (tile // kv_heads) % chunks
        prompt = tile // (kv_heads * chunks)
        first = prompt * group_size + chunk * sequences  # the tile's first sequence
        held = tl.minimum(sequences, group_size - chunk * sequences)  # how many sequences it holds
        partials = partial_ptr + tile.to(tl.int64) * slots * BLOCK_Q * HEAD_DIM  # [slots, BLOCK_Q, hd]
        stats = stats_ptr + tile.to(tl.int64) * slots * 2 * BLOCK_Q  # [slots, 2, BLOCK_Q]: best, total
        if program < prompt_slices:
            start = program * prompt_per_slice
            _prompt_slice(
                q_ptr, prompt_keys_ptr, prompt_values_ptr, prompt_valid_ptr + prompt * stride_valid,
                partials + program * BLOCK_Q * HEAD_DIM, stats + program * 2 * BLOCK_Q, first, held, prompt,
                head, groups, start, tl.minimum(start + prompt_per_slice, prompt_columns), scale, stride_qn,
                stride_qh, stride_pn, stride_ph, stride_pl, BLOCK_Q, BLOCK_L, HEAD_DIM, PRECISION,
            )  # fmt: skip
        else:  # slice `part` of the tile's `own`-th sequence's generated columns
            own = (program - prompt_slices) % sequences
            part = (program - prompt_slices) // sequences
            if own < held:
                # the step's token was written at `column`; the later columns are empty
                end = tl.load(column_ptr) + 1
                start = part * generated_per_slice
                slot = prompt_slices + part
                _generated_slice(
                    q_ptr, keys_ptr, values_ptr, partials + slot * BLOCK_Q * HEAD_DIM, stats + slot * 2 * BLOCK_Q,
                    first + own, own, head, groups, start, tl.minimum(start + generated_per_slice, end), scale,
                    stride_qn, stride_qh, stride_cn, stride_ch, stride_cl, BLOCK_Q, BLOCK_G, BLOCK_L, HEAD_DIM,
                    PRECISION,
                )  # fmt: skip
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        # the last program of the tile to arrive merges the slices and resets the counter
        if arrived == tl.num_programs(1) - 1:
            _merge(out_ptr, partials, stats, first, held, head, groups, slots, stride_on, stride_oh, BLOCK_Q,
                   HEAD_DIM)  # fmt: skip
            tl.atomic_xchg(counter_ptr + tile, 0)

    @triton.jit
    def _merge(out_ptr, partials, stats, first, held, head, groups, slots, stride_on, stride_oh,
               BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
        """The tile's output: its `slots` partial softmaxes merged, each query row's from the slices that
        saw it (a generated slot holds each sequence's rows of its slice)."""
        dim = tl.arange(0, HEAD_DIM)
        rows = tl.arange(0, BLOCK_Q)
        mask = rows < held * groups
        best = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
        for slot in range(slots):
            its_best = tl.load(
                stats + slot * 2 * BLOCK_Q + rows, mask=mask, other=float("-inf"), cache_modifier=".cg"
            )
            best = tl.maximum(best, its_best)
        shift = tl.where(best == float("-inf"), 0.0, best)
        total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
        for slot in range(slots):
            its_best = tl.load(
                stats + slot * 2 * BLOCK_Q + rows, mask=mask, other=float("-inf"), cache_modifier=".cg"
            )
            decay = tl.exp(its_best - shift)
            its_total = tl.load(stats + slot * 2 * BLOCK_Q + BLOCK_Q + rows, mask=mask, other=0.0,
                                cache_modifier=".cg")  # fmt: skip
            total += decay * its_total
            its_acc = tl.load(partials + slot * BLOCK_Q * HEAD_DIM + rows[:, None] * HEAD_DIM + dim[None, :],
                              mask=mask[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
            acc += decay[:, None] * its_acc
        out = acc / total[:, None]
        outputs = (first + rows // groups) * stride_on + head * stride_oh + (rows % groups) * HEAD_DIM
        tl.store(
            out_ptr + outputs[:, None] + dim[None, :], out.to(out_ptr.dtype.element_ty), mask=mask[:, None]
        )


def layout(count: int, prompts: int, groups: int) -> tuple[int, int, int]:
    """How a launch groups query rows: `(sequences a tile holds, tiles per prompt and KV head, BLOCK_Q)`:
    as many of a prompt's sequences as keep a tile's query rows within `QUERY_ROWS` (at least one)."""
    group_size = count // prompts
    sequences = max(1, min(group_size, QUERY_ROWS // groups))
    chunks = -(-group_size // sequences)
    return sequences, chunks, max(16, triton.next_power_of_2(sequences * groups))


def decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    column: Tensor,
    scale: float,
    prompt_keys: Tensor,
    prompt_values: Tensor,
    prompt_valid: Tensor,
    slices: tuple[int, int] | None = None,
    block_l: int = BLOCK_L,
    num_warps: int = NUM_WARPS,
) -> Tensor:
    """Softmax attention of `q` over its prompt's columns that `prompt_valid` marks and its own generated
    columns `0..column`.

    Args:
        q: `[N, kv_heads, groups, hd]`, the query heads that share a KV head side by side (contiguous);
            `N = P x G`, the G sequences of a prompt in consecutive rows.
        keys, values: `[N, kv_heads, steps, hd]` the generated tokens' caches (unit last stride, one layout).
        column: `[1]` long, the step's generated column: later columns are not read.
        prompt_keys, prompt_values: `[P, kv_heads, Lp, hd]` each prompt's cache (one layout).
        prompt_valid: `[P, Lp]` bool, the prompt columns a query may attend to (padding off).
        slices: `(prompt slices, generated slices per sequence)` a tile's columns are split into; default:
            enough for `PROGRAMS_PER_SM`.
        block_l, num_warps: columns per loop step and warps per program (benchmarks).
    Returns:
        `[N, kv_heads, groups, hd]` in `q`'s dtype (what SDPA returns for these inputs).
    """
    count, kv_heads, groups, head_dim = q.shape
    prompts, _, prompt_columns, _ = prompt_keys.shape
    if (
        not q.is_contiguous()
        or keys.stride() != values.stride()
        or keys.stride(-1) != 1
        or prompt_keys.stride() != prompt_values.stride()
        or prompt_keys.stride(-1) != 1
    ):
        raise ValueError(
            f"decode_attention needs contiguous q and unit-stride caches: q {q.stride()}, keys {keys.stride()}, "
            f"prompt keys {prompt_keys.stride()}"
        )
    if count % prompts:
        raise ValueError(f"{count} sequences are not G each of {prompts} prompts")
    sequences, chunks, block_q = layout(count, prompts, groups)
    tiles = prompts * chunks * kv_heads
    prompt_blocks = triton.cdiv(prompt_columns, block_l)
    generated_blocks = triton.cdiv(keys.shape[2], block_l)
    if slices is None:
        budget = triton.cdiv(PROGRAMS_PER_SM * multiprocessors(q.device), tiles)
        prompt_slices = max(1, min(prompt_blocks, MAX_PROMPT_SLICES, budget // 2))
        generated_slices = max(
            1, min(triton.cdiv(generated_blocks, GENERATED_BLOCKS), (budget - prompt_slices) // sequences)
        )
    else:
        prompt_slices, generated_slices = slices
    prompt_per_slice = triton.cdiv(prompt_blocks, prompt_slices) * block_l
    prompt_slices = triton.cdiv(prompt_columns, prompt_per_slice)  # none empty
    generated_per_slice = triton.cdiv(generated_blocks, generated_slices) * block_l
    generated_slices = triton.cdiv(keys.shape[2], generated_per_slice)
    slots = prompt_slices + generated_slices
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # per tile and slot the partial [block_q, hd] fp32 and its running max and sum [2, block_q]; the
    # arrival counters, as a split-K matmul's
    partial, counters = split_workspace(q, (tiles, 1, slots), block_q, head_dim)
    stats = q.new_empty(tiles * slots * 2 * block_q, dtype=torch.float32)
    _decode_attention_kernel[(tiles, prompt_slices + sequences * generated_slices)](
        q, keys, values, prompt_keys, prompt_values, prompt_valid.view(torch.uint8), column, out, partial, stats,
        counters, kv_heads, groups, count // prompts, chunks, sequences, prompt_columns, prompt_per_slice,
        generated_per_slice, prompt_slices, slots, scale, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), prompt_keys.stride(0),
        prompt_keys.stride(1), prompt_keys.stride(2), prompt_valid.stride(0), BLOCK_Q=block_q,
        BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_L=block_l, HEAD_DIM=head_dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no TF32 rounding
        num_warps=num_warps, **launch_options(q.device),
    )  # fmt: skip
    return out
