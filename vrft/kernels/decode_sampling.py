"""A decode step's token choice in one launch: temperature, the never-sampled ids, the EOS block before
`min_new_tokens`, the draw, the drawn token's log-prob, and the step's bookkeeping
(`vrft.rollout.static.TokenChooser`, whose torch ops are the reference).

Why hand-written: the torch ops were ~25 launches a decode step (a division, two softmaxes over the
vocabulary, the noise, argmax, gathers, index copies, `isin`, ...), ~130 us of a 7B step's GPU time at 16
sequences plus the gaps between the launches (bench/rollout/results.md). torch.compile would fuse them,
but it compiles per shape for minutes, and its own CUDA graphs and RNG would sit inside the decode step's
graph. Here one pass over each row's logits, split along the vocabulary, keeps the log-sum-exp of the
scaled logits (for the log-prob) and the best draw; the last program of a row to arrive (an atomic
counter it resets, as in `nf4_epilogue.store_output`) merges the slices and writes the row's token, and
the last row advances the step counter.

The draw is the torch path's exponential race: the token is `argmax p / E` with `E ~ Exp(1)` drawn per
token, written as `argmax m - log E` over the unnormalised log-weights `m`. `E = -log u` with `u` from
Philox (`tl.rand`), keyed by a seed drawn from torch's generator once per rollout plus the step counter
(read on the device, so each CUDA-graph replay draws anew). `u` is kept below 1 - 2^-24 so that `E` is
never 0 (a token of weight 0 could otherwise win); `u = 0` gives `E = inf`, a token that cannot win.
Greedy decoding takes `argmax m`, the first index of a tie as `torch.argmax`.

Numerics: the temperature division is IEEE (`div_rn`) as torch's; the log-prob is `s - (max + log sum
exp(s - max))` in fp32, torch's `log_softmax` up to the order of the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vrft.kernels.launch_order import launch_options
from vrft.kernels.workspace import multiprocessors, split_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: TokenChooser's torch ops run instead
    triton = None

BLOCK = 1024  # vocabulary columns per loop step
PROGRAMS_PER_SM = 2  # the vocabulary split aims at this many programs per multiprocessor


if triton is not None:
    from vrft.kernels.launch_order import wait_for_inputs

    @triton.jit
    def _scaled(logits, temperature, SAMPLE: tl.constexpr, PTX: tl.constexpr):
        """The logits the draw and the log-prob see: divided by the temperature when sampling."""
        if SAMPLE:
            if PTX:
                return tl.math.div_rn(logits, temperature)
            else:
                return logits / temperature
        else:
            return logits

    @triton.jit
    def _choose_kernel(
        logits_ptr, suppress_ptr, eos_ptr, seed_ptr, step_ptr, min_new_ptr, done_ptr, tokens_ptr,
        completion_ptr, logprobs_ptr, partial_ptr, counter_ptr, vocab, columns_per_slice, temperature, pad_id,
        num_eos, stride_l, stride_c, stride_p, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, PTX: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        wait_for_inputs(PDL)
        row, part = tl.program_id(0), tl.program_id(1)
        rows, parts = tl.num_programs(0), tl.num_programs(1)
        step = tl.load(step_ptr)
        blocked = step < tl.load(min_new_ptr)  # the EOS ids may not be drawn yet
        seed = tl.load(seed_ptr) + step
        start = part * columns_per_slice
        stop = tl.minimum(start + columns_per_slice, vocab)
        most = float("-inf")  # running max of the scaled logits
        total = 0.0  # running sum of exp(scaled - most)
        best = float("-inf")  # best key so far, its column and its scaled logit
        best_column = 0
        best_scaled = float("-inf")
        for first in range(start, stop, BLOCK):
            column = first + tl.arange(0, BLOCK)
            inside = column < stop
            logits = tl.load(logits_ptr + row * stride_l + column, mask=inside, other=float("-inf"))
            scaled = _scaled(logits.to(tl.float32), temperature, SAMPLE, PTX)
            new_most = tl.maximum(most, tl.max(scaled, 0))
            shift = tl.where(new_most == float("-inf"), 0.0, new_most)
            total = total * tl.exp(most - shift) + tl.sum(tl.exp(scaled - shift), 0)
            most = new_most
            weight = scaled + tl.load(suppress_ptr + column, mask=inside, other=0.0)
            for index in range(num_eos):  # -inf at the EOS ids while the step is below min_new_tokens
                eos = (column == tl.load(eos_ptr + index)) & blocked
                weight = tl.where(eos, float("-inf"), weight)
            key = weight
            if SAMPLE:
                uniform = tl.minimum(tl.rand(seed, row * vocab + column), 1.0 - 2.0**-24)
                key = weight - tl.log(-tl.log(uniform))  # m - log E, E = -log u
            block_best = tl.max(key, 0)
            if block_best > best:  # strictly: a tie keeps the earlier column
                best = block_best
                best_column = tl.argmax(key, 0) + first
                best_scaled = tl.max(tl.where(column == best_column, scaled, float("-inf")), 0)
        # the slice's partial, 8 fp32 words (5 used): max and sum of exp of the scaled logits, the best key,
        # its column and its scaled logit
        slot = partial_ptr + (row * parts + part) * 8
        tl.store(slot + 0, most)
        tl.store(slot + 1, total)
        tl.store(slot + 2, best)
        tl.store(slot + 3, best_column.to(tl.float32))  # exact: the vocabulary is below 2^24
        tl.store(slot + 4, best_scaled)
        tl.debug_barrier()  # every store is made before the release below
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if arrived == parts - 1:  # the last slice of the row: merge, write the row's token
            _finish(logits_ptr, eos_ptr, step_ptr, done_ptr, tokens_ptr, completion_ptr, logprobs_ptr,
                    partial_ptr, counter_ptr, row, rows, parts, step, temperature, pad_id, num_eos, stride_l,
                    stride_c, stride_p, SAMPLE, PTX)  # fmt: skip

    @triton.jit
    def _finish(logits_ptr, eos_ptr, step_ptr, done_ptr, tokens_ptr, completion_ptr, logprobs_ptr, partial_ptr,
                counter_ptr, row, rows, parts, step, temperature, pad_id, num_eos, stride_l, stride_c, stride_p,
                SAMPLE: tl.constexpr, PTX: tl.constexpr):  # fmt: skip
        """Row `row`'s slices merged: its token (the pad id once the row is done), the token's log-prob,
        the row's done flag; the last row to finish advances the step and resets the counters."""
        most = float("-inf")
        for part in range(parts):
            most = tl.maximum(most, tl.load(partial_ptr + (row * parts + part) * 8, cache_modifier=".cg"))
        shift = tl.where(most == float("-inf"), 0.0, most)
        total = 0.0
        best = float("-inf")
        token = tl.full([], 0, tl.int64)
        token_scaled = float("-inf")
        for part in range(parts):
            slot = partial_ptr + (row * parts + part) * 8
            total += tl.load(slot + 1, cache_modifier=".cg") * tl.exp(
                tl.load(slot, cache_modifier=".cg") - shift
            )
            key = tl.load(slot + 2, cache_modifier=".cg")
            if key > best:
                best = key
                token = tl.load(slot + 3, cache_modifier=".cg").to(tl.int64)
                token_scaled = tl.load(slot + 4, cache_modifier=".cg")
        done = tl.load(done_ptr + row) != 0
        if done:  # a finished row is fed the pad token; its log-prob is the pad's, as the torch path records
            token = pad_id.to(tl.int64)
            token_scaled = _scaled(tl.load(logits_ptr + row * stride_l + pad_id).to(tl.float32), temperature,
                                   SAMPLE, PTX)  # fmt: skip
        stopped = done
        for index in range(num_eos):
            stopped = stopped | (token == tl.load(eos_ptr + index))
        tl.store(completion_ptr + row * stride_c + step, token)
        tl.store(logprobs_ptr + row * stride_p + step, token_scaled - (shift + tl.log(total)))
        tl.store(tokens_ptr + row, token)
        tl.store(done_ptr + row, stopped.to(tl.int8))
        tl.atomic_xchg(counter_ptr + row, 0)
        finished = tl.atomic_add(counter_ptr + rows, 1, sem="acq_rel")
        if finished == rows - 1:  # every row has read the step: advance it
            tl.store(step_ptr, step + 1)
            tl.atomic_xchg(counter_ptr + rows, 0)


def choose(
    logits: Tensor,
    suppress: Tensor,
    eos: Tensor,
    seed: Tensor,
    step: Tensor,
    min_new: Tensor,
    done: Tensor,
    tokens: Tensor,
    completion: Tensor,
    logprobs: Tensor,
    temperature: float,
    pad_id: int,
    sample: bool,
    slices: int | None = None,
) -> None:
    """`TokenChooser.choose` for `logits [N, V]` (fp32) in one launch, in place.

    Args:
        suppress: `[V]` fp32, -inf at the never-sampled ids, else 0.
        eos: `[E]` long, the stop ids (blocked while `step < min_new`).
        seed: `[1]` long, the rollout's draw seed; `step`, `min_new`: `[1]` long (`step` is advanced by 1).
        done: `[N]` bool, rows already stopped (updated); `tokens`: `[N]` long, set to the chosen tokens.
        completion: `[N, C]` long and `logprobs`: `[N, C]` fp32, written at column `step`.
        temperature, sample: the draw (`sample` False: greedy, the logits unscaled, as the torch path).
        slices: programs per row along the vocabulary (default: enough for `PROGRAMS_PER_SM`).
    """
    rows, vocab = logits.shape
    if vocab >= 2**24 or logits.stride(-1) != 1:
        raise ValueError(
            f"logits {tuple(logits.shape)} (stride {logits.stride()}): need V < 2^24, unit stride"
        )
    if slices is None:
        slices = max(
            1,
            min(
                triton.cdiv(vocab, BLOCK), triton.cdiv(PROGRAMS_PER_SM * multiprocessors(logits.device), rows)
            ),
        )
    columns_per_slice = triton.cdiv(triton.cdiv(vocab, slices), BLOCK) * BLOCK
    slices = triton.cdiv(vocab, columns_per_slice)  # none empty
    _, counters = split_workspace(logits, (rows + 1, 1, 1), 1, 1)  # a counter per row, one for the rows
    partial = logits.new_empty(rows * slices * 8, dtype=torch.float32)
    _choose_kernel[(rows, slices)](
        logits, suppress, eos, seed, step, min_new, done.view(torch.int8), tokens, completion, logprobs, partial,
        counters, vocab, columns_per_slice, float(temperature), pad_id, eos.numel(), logits.stride(0),
        completion.stride(0), logprobs.stride(0), SAMPLE=sample, BLOCK=BLOCK, PTX=logits.is_cuda, num_warps=4,
        **launch_options(logits.device),
    )  # fmt: skip
