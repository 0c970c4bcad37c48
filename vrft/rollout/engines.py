"""Rollout engines: how the G completions per prompt are generated. Chosen by `algorithm.rollout_engine`.

- `hf`: `model.generate` on the training-time model. Per decode step it pays Python and kernel-launch
  overhead for every layer, and on bnb 4-bit weights it dequantises every matrix: about the same time per
  step for 2B and 7B, far from the GPU's bandwidth.
- `bf16_copy`: the static decoder (`vrft.rollout.decoder`) over a bf16 copy of the language model with the
  current LoRA merged in, one decode step replayed as a CUDA graph. Memory: +2 bytes per language-model
  parameter for the duration of the rollout.
- `dequant`: the same decoder and graph, but weights stay packed and are dequantised one matrix at a time
  inside the step, with LoRA applied unmerged. Memory: one bf16 matrix of scratch; for 7B on 16 GB.
- `packed`: as `dequant`, but the decode steps multiply the packed 4-bit weights in a fused Triton kernel
  (`vrft.rollout.packed`): no bf16 matrix is written. Needs Triton and a CUDA GPU of compute capability 8.0+.

The static engines prefill each prompt once (not G times), keep its KV cache once for its G rows (each row
holds only its generated tokens' keys and values; the decode attention reads the prompt's once for the G
rows: `vrft.kernels.decode_attention`), and sample with the same distribution as `generate` (temperature,
top-p, min/max new tokens; on CUDA in one kernel: `vrft.kernels.decode_sampling`), so their completions are
samples of the training-time policy; `tests/rollout/test_engines.py` checks greedy equality.
"""

from __future__ import annotations

from vrft.rollout.base import RolloutEngine, Sampling
from vrft.rollout.hf import HFGenerate, InverseCdfSampler
from vrft.rollout.packed import PackedEngine
from vrft.rollout.static import Bf16CopyEngine, DequantEngine, StaticDecodeEngine

__all__ = [
    "ROLLOUT_ENGINES",
    "Bf16CopyEngine",
    "DequantEngine",
    "HFGenerate",
    "InverseCdfSampler",
    "PackedEngine",
    "RolloutEngine",
    "Sampling",
    "StaticDecodeEngine",
    "build_rollout_engine",
]

ROLLOUT_ENGINES: dict[str, type[RolloutEngine]] = {
    engine.name: engine for engine in (HFGenerate, Bf16CopyEngine, DequantEngine, PackedEngine)
}


def check_rollout_engine(name: str, key: str = "algorithm.rollout_engine", auto: bool = True) -> None:
    """Raise `ValueError` naming `key` unless `name` is a registered engine (or `auto`, where `auto` may
    stand): the entry points call it before anything loads."""
    if name in ROLLOUT_ENGINES or (auto and name == "auto"):
        return
    names = sorted(ROLLOUT_ENGINES) + (["auto"] if auto else [])
    raise ValueError(
        f"{key}='{name}' is not one of {names}; hf is plain generate, bf16_copy the fastest (+2 bytes per "
        "LM parameter), dequant the leanest, packed dequant's memory through a fused 4-bit kernel (CUDA + "
        "Triton)" + (", auto the fastest that fits here" if auto else "")
    )


def build_rollout_engine(name: str, key: str = "algorithm.rollout_engine") -> RolloutEngine:
    """The engine registered under `name` (the value of `key`)."""
    check_rollout_engine(name, key, auto=False)
    return ROLLOUT_ENGINES[name]()
