"""Decode speed of rollout engines on one trained policy, and how well their log-probs match training's.

Time per decode step = (time for N new tokens - time for 1) / (N - 1): prefill, weight preparation and
graph capture of the static engines are in both terms or amortised over N, as in a real rollout.
Bandwidth: the bytes of weights one decode step must read, as the engine stores them (packed 4-bit for
`hf` and `dequant`, bf16 for `bf16_copy`), divided by the step time, against the GPU's bandwidth.
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch

from vrft.kernels import decode_fusions, launch_order, nf4_matmul, nf4_mma
from vrft.precision.accounting import weight_bytes
from vrft.rollout import packed, stages
from vrft.rollout.batch import build_prompts
from vrft.rollout.decoder import text_parts
from vrft.rollout.engines import build_rollout_engine
from vrft.rollout.generate import generate_rollout

# Datasheet memory bandwidth, bytes/s, by a part of the CUDA device name (an H200's device-to-device copy
# measured ~4.3e12); the bound of "% of bound" is that of the card the run had.
BANDWIDTHS = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "RTX 4090": 1.008e12}


def device_bandwidth() -> tuple[str, float]:
    """The CUDA device's name and datasheet bandwidth (the H200's where the name is not in `BANDWIDTHS`)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, next((b for part, b in BANDWIDTHS.items() if part in name), BANDWIDTHS["H200"])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_weight_bytes(policy, dense: bool) -> int:
    """Weight bytes one decode step reads: decoder layers, final norm and lm_head (not the embedding)."""
    _, language_model, lm_head = text_parts(policy)
    modules = [language_model.layers, language_model.norm, lm_head]
    if not dense:
        return sum(weight_bytes(m) for m in modules)
    total = 0
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_" in name:
                continue  # merged into the dense copy
            count = param.numel() * (2 if param.dtype == torch.uint8 else 1)  # packed 4-bit: two per byte
            total += count * 2
    return total


UNFUSED = ":unfused"  # engine name suffix: the decode step with torch's element-wise ops (fused_decode=False)
# engine name suffix -> the module switch it sets while the engine generates, and to what
SWITCHES = {
    ":mma": (nf4_matmul, "MMA_KERNEL", True),  # the 4-bit matmuls through nf4_mma's kernel
    ":nf4_matmul": (nf4_matmul, "MMA_KERNEL", False),  # through nf4_matmul's own kernel
    ":serial": (launch_order, "PROGRAMMATIC", False),  # each kernel launched after the last has drained
}


class _AdapterFree(packed.KernelLinear):
    """A `KernelLinear` that drops its adapters: the 4-bit matmul alone (`:no_lora`)."""

    def __init__(self, op):
        super().__init__(op)
        self.loras, self.shared = [], None


_ZEROS: dict = {}


def _zero_product(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Zeros of `lora_input`'s result shape `[rows, ranks]`, one tensor per shape, made at the first (eager)
    decode step, so that the captured step has no launch for it (`:free_lora_input`)."""
    key = (inputs.device, inputs.dtype, inputs.shape[0], weight.shape[0])
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(key[2:], device=inputs.device, dtype=inputs.dtype)
    return _ZEROS[key]


# Ablations: the decode step with one part taken out, which then computes wrong tokens (timing only).
# What the step would take if that part cost nothing: what is left to gain there.
ABLATIONS = {
    ":no_lora": (packed, "KernelLinear", _AdapterFree),  # no adapter: no x A^T, no LoRA term
    # no `lora_input` launch: the LoRA term reads zeros (the 4-bit kernel still promises x_ready, so its K
    # loop may read the previous step's x: a timing that flatters the engine's chain without that launch by
    # ~0.4 ms, bench/rollout/results.md, "x A^T in the 4-bit launch"; `:x_waits` below takes that away)
    ":free_lora_input": (packed, "lora_input", _zero_product),
    ":free_attention": (stages, "decode_attention", lambda q, *args, **kwargs: q),  # q for the output
    # the residual add and RMSNorm: the hidden state passes on as it came
    ":free_norm": (decode_fusions, "add_rms_norm", lambda hidden, delta, weight, eps: (hidden, hidden)),
    # the gate for silu(gate) * up, and not folded into the gate/up launch either
    ":free_silu": [(decode_fusions, "silu_mul", lambda gate, up: gate), (packed, "FOLD_SILU", False)],
}
SWITCHES.update(ABLATIONS)


def _waiting_for_x(matmul):
    """`matmul` (`matmul_4bit` or `matmul_4bit_segments`) called with `x_ready` off: the K loop waits for x's
    writer, as a 4-bit launch must where no `lora_input` launch stands between the two."""
    return lambda *args, x_ready=False, **kwargs: matmul(*args, x_ready=False, **kwargs)


# With `:free_lora_input`, what an `x A^T` computed outside its own launch could give at best: the K loop
# then waits for x (stack both: `packed:free_lora_input:x_waits:x_waits_grouped`)
SWITCHES.update(
    {
        ":x_waits": (packed, "matmul_4bit", _waiting_for_x(packed.matmul_4bit)),
        ":x_waits_grouped": (packed, "matmul_4bit_segments", _waiting_for_x(packed.matmul_4bit_segments)),
    }
)
# silu(gate) * up written by the gate/up launch (packed.FOLD_SILU) or by a SiLU launch of its own
SWITCHES.update({":fold_silu": (packed, "FOLD_SILU", True), ":unfold_silu": (packed, "FOLD_SILU", False)})
# nf4_mma's K split aimed at other counts of programs a multiprocessor (MMA_DEFAULTS' programs_per_sm: 8;
# `:pps8` is the default again, a second run of it in the same call)
SWITCHES.update(
    {
        f":pps{count}": (nf4_mma, "MMA_DEFAULTS", {**nf4_mma.MMA_DEFAULTS, "programs_per_sm": count})
        for count in (4, 6, 8, 12)
    }
)


class _WithSwitch:
    """An engine whose `generate` runs with `module.attribute` set to `value` (its CUDA graph is captured
    inside `generate`, so the graph holds the kernels as launched then), the switch put back after:
    `switch` is a `SWITCHES` entry, one `(module, attribute, value)` or a list of them."""

    def __init__(self, engine, switch):
        self._engine, self._switches = engine, switch if isinstance(switch, list) else [switch]

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for switch in self._switches:
                stack.enter_context(mock.patch.object(*switch))
            return self._engine.generate(*args, **kwargs)


def engine_for(name: str, **options):
    """The engine `name` names: `bf16_copy`, `bf16_copy:unfused` for its torch-ops decode step, `packed:mma`
    and `packed:nf4_matmul` for `packed` with nf4_mma's kernel and without it (an engine without either
    suffix runs with the switch as it is: VRFT_NF4_MMA), `...:serial` without programmatic dependent launch
    (vrft.kernels.launch_order), `ABLATIONS`' suffixes with a part of the step taken out; suffixes stack
    (`packed:mma:serial`)."""
    from vrft.rollout.engines import ROLLOUT_ENGINES

    for suffix, switch in SWITCHES.items():
        if name.endswith(suffix):
            return _WithSwitch(engine_for(name.removesuffix(suffix), **options), switch)
    if name.endswith(UNFUSED):
        return ROLLOUT_ENGINES[name.removesuffix(UNFUSED)](fused_decode=False, **options)
    return ROLLOUT_ENGINES[name](**options) if options else build_rollout_engine(name)


def sampling(tokens: int) -> dict:
    return dict(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens
    )


def decode_speed(module, rows: list[dict], engines: list[str], tokens: int) -> dict:
    """Per engine: ms per decode step, tokens/s over the batch, weight bytes per step and bandwidth fraction."""
    policy, processor = module.policy, module.processor
    policy.eval()
    prompts = build_prompts(processor, rows, module.prompt_template, module.device)
    tokenizer = processor.tokenizer
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    group = module.settings.group_size
    count = prompts.input_ids.shape[0] * group
    text = module.policy.config.text_config
    kv_width = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)  # keys + values
    layers = text.num_hidden_layers
    results = {}
    device, bandwidth = device_bandwidth()
    for name in engines:
        engine = engine_for(name)
        try:
            for n in (1, tokens):  # warm-up of both timed lengths: Triton compiles a kernel for each
                # specialisation it sees (a stride of 1 is one: the 1-token run's completion buffer)
                engine.generate(policy, prompts, group, sampling(n), eos, tokenizer.pad_token_id)
            seconds = {}
            for n in (1, tokens):
                _sync()
                start = time.perf_counter()
                engine.generate(policy, prompts, group, sampling(n), eos, tokenizer.pad_token_id)
                _sync()
                seconds[n] = time.perf_counter() - start
            step = (seconds[tokens] - seconds[1]) / (tokens - 1)
            weights = step_weight_bytes(policy, dense=name.split(":")[0] == "bf16_copy")
            # keys and values read at the average step: the static engines keep each prompt's once for its
            # G rows (vrft.rollout.decoder.DecodeState), `hf` G copies
            prompt_rows = count if name.split(":")[0] == "hf" else prompts.input_ids.shape[0]
            kv = layers * (prompt_rows * prompts.input_ids.shape[1] + count * tokens / 2) * kv_width * 2
            results[name] = {
                "step_ms": step * 1e3,
                "tokens_per_s": count / step,
                "rollout_seconds": seconds[tokens],
                "weight_bytes_per_step": weights,
                "kv_bytes_per_step": kv,
                "device": device,
                "bandwidth": bandwidth,
                "weight_bandwidth_fraction": weights / step / bandwidth,
                "weight_and_kv_bandwidth_fraction": (weights + kv) / step / bandwidth,
                "engine_stats": dict(engine.last_stats),
            }
        except (
            Exception
        ) as error:  # an OOM (or a failing engine) is a result too; the other engines still run
            results[name] = {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
        finally:
            del engine
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if "hf" in results and "step_ms" in results["hf"]:
        for result in results.values():
            if "step_ms" in result:
                result["speedup_vs_hf"] = results["hf"]["step_ms"] / result["step_ms"]
    return results


def logprob_agreement(module, rows: list[dict], engines: list[str], tokens: int = 32) -> dict:
    """Per static engine: |engine log-prob - training-forward log-prob| of the sampled tokens (mean, max)."""
    results = {}
    for name in engines:
        engine = engine_for(name)
        try:
            module.policy.eval()
            rollout = generate_rollout(
                module.policy,
                module.processor,
                rows,
                module.prompt_template,
                module.settings.group_size,
                sampling(tokens),
                module.device,
                engine=engine,
            )
            with torch.no_grad():
                trained = module.rollout_logprobs(rollout)
            mask = rollout.completion_mask.bool()
            diff = (engine.last_logprobs[:, : trained.shape[1]] - trained)[mask].abs()
            results[name] = {
                "mean_abs_logprob_diff": float(diff.mean()),
                "max_abs_logprob_diff": float(diff.max()),
                "mean_logprob": float(trained[mask].mean()),
                "tokens": int(mask.sum()),
            }
        except (
            Exception
        ) as error:  # an OOM (or a failing engine) is a result too; the other engines still run
            results[name] = {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
    return results


def _kernel_times(engine, policy, prompts, group, tokens, eos, pad) -> dict[str, tuple[float, int]]:
    """GPU time (us) and launches per kernel name over one `generate` of `tokens` new tokens."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(policy, prompts, group, sampling(tokens), eos, pad)
        _sync()
    times: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        # kernels only: a CPU op's entry also carries the device time of the kernels it launched
        total = event.self_device_time_total if event.device_type == DeviceType.CUDA else 0.0
        if total > 0:
            before = times.get(event.key, (0.0, 0))
            times[event.key] = (before[0] + total, before[1] + event.count)
    return times


def decode_kernel_profile(module, rows: list[dict], engines: list[str], tokens: int = 33) -> dict:
    """Per engine: GPU time per decode step by kernel, the static engine run eagerly (no CUDA graph).

    Two profiled runs, of 1 and of `tokens` new tokens: their difference over `tokens - 1` is what one decode
    step spends in each kernel (prefill and weight preparation cancel). The sum is the step's GPU-busy time;
    against the graph-replayed step time it shows how much of that step is kernels rather than gaps.
    """
    policy, processor = module.policy, module.processor
    policy.eval()
    prompts = build_prompts(processor, rows, module.prompt_template, module.device)
    tokenizer = processor.tokenizer
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    group = module.settings.group_size
    results = {}
    for name in engines:
        try:
            engine = engine_for(name, cuda_graph=False)
            engine.generate(policy, prompts, group, sampling(4), eos, tokenizer.pad_token_id)  # warm-up
            short = _kernel_times(engine, policy, prompts, group, 1, eos, tokenizer.pad_token_id)
            long = _kernel_times(engine, policy, prompts, group, tokens, eos, tokenizer.pad_token_id)
            per_step = {}
            for kernel, (us, calls) in long.items():
                us_short, calls_short = short.get(kernel, (0.0, 0))
                per_step[kernel] = ((us - us_short) / (tokens - 1), (calls - calls_short) / (tokens - 1))
            ranked = sorted(per_step.items(), key=lambda item: -item[1][0])
            results[name] = {
                "gpu_us_per_step": sum(us for us, _ in per_step.values()),
                "launches_per_step": sum(calls for _, calls in per_step.values()),
                "top": [
                    {"kernel": kernel[:160], "us_per_step": us, "calls_per_step": calls}
                    for kernel, (us, calls) in ranked[:15]
                ],
            }
        except Exception as error:  # a profile is extra evidence: a failure is recorded, the run goes on
            results[name] = {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
        finally:
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results
