"""Programmatic dependent launch: a decode-step kernel starts while the kernel before it drains.

Why: the packed engine's decode step is ~400 small launches replayed as one CUDA graph, and on an H100 it
took 6.1 ms of wall time for 5.4 ms of kernel time (bench/rollout/results.md): the rest is the time
between one kernel's last program ending and the next one's first program starting, ~1.7 us a launch.
Hopper (sm_90) and later can overlap the two. A kernel launched with CUDA's programmatic stream
serialization attribute (Triton's `launch_pdl` option; CUDA graphs capture it as a programmatic edge) may
have its programs placed as soon as every program of the kernel before it has executed
`griddepcontrol.launch_dependents`; each then waits in `griddepcontrol.wait` until that kernel has
finished and its writes are visible.

The contract each kernel keeps: nothing the kernel launched just before it may still be writing, and
nothing it writes, is touched before `wait_for_inputs`. What it may do before: load its own constant inputs
(the 4-bit kernel's first codes and absmax), so that their memory latency hides behind the earlier kernel's
tail, and, where its caller promises `x_ready` (`nf4_mma.launch`), run its whole K loop on an `x` that an
earlier kernel finished. Measured (bench/rollout/results.md): the 7B decode step 10% faster on an H200,
8% on an H100. The
instructions are Triton's own (`triton.language.extra.cuda.gdc_wait`, `gdc_launch_dependents`): both
are no-ops in a kernel launched without the attribute, but they only assemble for sm_90 and later, so the
`PDL` constant compiles them out for older cards (the RTX 4090 is sm_89) and the interpreter.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: no kernel is launched
    triton = None

# Benchmarks switch it off to time the difference (bench/memory/speed.py's `:serial` engines); a kernel
# launch reads it each call, so a CUDA graph keeps what was set when it was captured.
PROGRAMMATIC = True


def programmatic(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (`PROGRAMMATIC`, CUDA, sm_90+).

    The kernels take it as their `PDL` constant and as Triton's `launch_pdl` option (`launch_options`)."""
    return PROGRAMMATIC and device.type == "cuda" and _hopper_or_later(device)


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """What a kernel launch on `device` passes: the `PDL` constant and Triton's `launch_pdl` option."""
    pdl = programmatic(device)
    return {"PDL": pdl, "launch_pdl": pdl}


if triton is not None:

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Wait until the kernel before has finished (its writes visible), then let the next one be placed.

        Before this, a kernel may only read its own constant inputs (module docstring). `launch_dependents`
        comes after the wait so that at most two kernels overlap: the next one's programs can then only be
        waiting on this one, which is already running."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
