"""One benchmark row: a short GRPO run of the real training code under a memory cap, written as one JSON.

    python bench/memory/run_row.py --name NAME --images DIR --out ROW.json [--speed hf,dequant] -- OVERRIDES...

The run is `vrft.train.fit` on the row's Hydra overrides plus the settings every row shares (`BASE`):
completions forced to 256 tokens, a rollout of 2 prompts x G, LoRA r=64 on every language-model projection,
one rollout per optimizer step (accumulating 16 prompts adds only the stored rollouts, which the planner
counts), two optimizer steps (the second is the steady state: optimizer state exists). Per phase it records
peak allocated and reserved CUDA memory; then, optionally, decode speed of several rollout engines on the
same model (`--speed`), their log-prob agreement with the training-time forward, and the planner's prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from vrft.runtime.cuda import configure_allocator

configure_allocator()  # before torch touches CUDA

import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import open_dict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_init import fast_random_preset  # noqa: E402
from memory_trace import phase_trace, summarise  # noqa: E402
from rows import compose_row  # noqa: E402
from speed import decode_kernel_profile, decode_speed, logprob_agreement  # noqa: E402

import vrft.models.policy  # noqa: E402
from vrft.planner.planning import plan_config, precision_name, resolve_auto  # noqa: E402
from vrft.train import fit  # noqa: E402

ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


class PhaseProbe:
    """Wraps the module's `PhaseTracker`: per phase its wall-clock span (to match a GPU clock log), the
    allocator's cudaMalloc / cudaFree / retry counts within it, and (`trace`) the allocations live at the
    peak of the last step's rollout (`memory_trace.summarise`)."""

    def __init__(self, tracker, trace: bool = False, steps: int = 2):
        self.tracker, self.trace, self.steps = tracker, trace, steps
        self.records: list[dict] = []
        self.rollouts = 0
        self.rollout_trace: dict | None = None

    def __getattr__(self, name):
        return getattr(self.tracker, name)

    @contextlib.contextmanager
    def __call__(self, name: str, device: torch.device):
        cuda = device.type == "cuda"
        before = torch.cuda.memory_stats(device) if cuda else {}
        record = {"phase": name, "start": time.time(), "start_allocated_gb": 0.0}
        if cuda:
            record["start_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        if name == "rollout":
            self.rollouts += 1
        traced = cuda and self.trace and name == "rollout" and self.rollouts == self.steps
        with contextlib.ExitStack() as stack:
            trace = stack.enter_context(phase_trace()) if traced else None
            stack.enter_context(self.tracker(name, device))
            yield
        record["end"] = time.time()
        if cuda:
            after = torch.cuda.memory_stats(device)
            record.update({key: after.get(key, 0) - before.get(key, 0) for key in ALLOCATOR_COUNTERS})
        if trace is not None:
            self.rollout_trace = summarise(trace.snapshot, trace.start_allocated)
        self.records.append(record)


class StepProbe(L.Callback):
    """Per optimizer step: wall time, the module's phase peaks and the logged metrics; at the end of training
    (before Lightning's teardown moves the model back to the CPU) the decode-speed probe, if asked."""

    def __init__(
        self,
        engines: list[str],
        tokens: int,
        profiled: list[str] | None = None,
        phase_probe: dict | None = None,
    ):
        self.phase_probe = phase_probe  # PhaseProbe's arguments (None: no probe)
        self.phases: PhaseProbe | None = None
        self.steps: list[dict] = []
        self.start = 0.0
        self.engines, self.tokens, self.profiled = engines, tokens, profiled or []
        self.speed: dict | None = None
        self.agreement: dict | None = None
        self.profile: dict | None = None

    def on_train_start(self, trainer, pl_module):
        if self.phase_probe is not None:
            self.phases = pl_module.phases = PhaseProbe(pl_module.phases, **self.phase_probe)

    def on_train_end(self, trainer, pl_module):
        if not self.engines:
            return
        rows = [trainer.datamodule.splits["train"][i] for i in range(pl_module.settings.rollout_batch_size)]
        with trainer.precision_plugin.forward_context():
            self.speed = decode_speed(pl_module, rows, self.engines, self.tokens)
            self.agreement = logprob_agreement(pl_module, rows, [e for e in self.engines if e != "hf"])
            if self.profiled:
                self.profile = decode_kernel_profile(pl_module, rows, self.profiled)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module._pending:  # mid-accumulation: no optimizer step yet
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(
            {
                "seconds": time.perf_counter() - self.start,
                "phases": {name: asdict(peak) for name, peak in pl_module.phases.peaks.items()},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            }
        )


def settings(cfg, module) -> dict:
    a = cfg.algorithm
    image_tokens = prompt_tokens = None
    if module is not None and module.processor is not None:
        from vrft.rollout.batch import build_prompts

        prompts = build_prompts(
            module.processor, [module.trainer.datamodule.splits["train"][0]], "{problem}", "cpu"
        )
        prompt_tokens = int(prompts.input_ids.shape[1])
        image_tokens = int((prompts.input_ids == 151655).sum())
    return {
        "model": str(cfg.model.name_or_path),
        "precision": precision_name(cfg.precision),
        "optimizer": str(cfg.optimizer._target_).rsplit(".", 1)[-1],
        "rollout_engine": str(a.rollout_engine),
        "group_size": int(a.group_size),
        "rollout_batch_size": int(a.rollout_batch_size),
        "update_micro_batch_size": int(a.update_micro_batch_size),
        "max_new_tokens": int(a.max_new_tokens),
        "logprob_chunk_size": int(a.logprob_chunk_size),
        "max_pixels": int(cfg.model.max_pixels),
        "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "lora_r": int(cfg.lora.r),
        "prompts_per_step": int(a.prompts_per_step),
        "memory_cap_gb": cfg.get("memory_cap_gb"),
        "prompt_tokens": prompt_tokens,
        "image_tokens": image_tokens,
    }


def measured(steps: list[dict]) -> dict:
    phases: dict[str, dict] = {}
    for step in steps:
        for name, peak in step["phases"].items():
            best = phases.setdefault(name, {"allocated_gb": 0.0, "reserved_gb": 0.0})
            best["allocated_gb"] = max(best["allocated_gb"], peak["allocated_gb"])
            best["reserved_gb"] = max(best["reserved_gb"], peak["reserved_gb"])
    last = steps[-1] if steps else {"metrics": {}, "seconds": None}
    return {
        "phases": phases,
        "peak_allocated_gb": max((p["allocated_gb"] for p in phases.values()), default=None),
        "peak_reserved_gb": max((p["reserved_gb"] for p in phases.values()), default=None),
        "peak_phase": max(phases, key=lambda n: phases[n]["reserved_gb"]) if phases else None,
        "seconds_per_step": last["seconds"],
        "rollout_seconds": last["metrics"].get("time/rollout_s"),
        "update_seconds": last["metrics"].get("time/update_s"),
        "reference_seconds": last["metrics"].get("time/reference_s"),
        "rollout_tokens_per_s": last["metrics"].get("throughput/generated_tokens_per_s"),
    }


def plan_record(cfg, prompt_tokens: int | None, image_tokens: int | None) -> dict:
    if prompt_tokens and image_tokens:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.plan.prompt_text_tokens = prompt_tokens - image_tokens
            cfg.plan.image_tokens = image_tokens
    plan = plan_config(cfg)
    return {
        "peak_reserved_gb": plan.peak_reserved_gb,
        "device_gb": plan.device_gb,
        "peak_phase": plan.peak_phase,
        "phases_gb": {k: v / 2**30 for k, v in plan.phases.items()},
        "components_gb": plan.components_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--speed", default="", help="comma-separated rollout engines to time after training")
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument(
        "--profile", default="", help="comma-separated static engines whose decode step is profiled by kernel"
    )
    parser.add_argument(
        "--concurrent", type=int, default=1, help="rows sharing the GPU (timings then overlap)"
    )
    parser.add_argument(
        "--phase-stats", action="store_true", help="per phase: wall-clock span, cudaMalloc/cudaFree counts"
    )
    parser.add_argument(
        "--trace-rollout",
        action="store_true",
        help="the allocations live at the last rollout's peak, by site",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    vrft.models.policy.random_preset = fast_random_preset  # seconds instead of minutes for 7B

    cfg = resolve_auto(compose_row(args.overrides, args.images, f"/tmp/vrft-bench/{args.name}"))
    record = {
        "name": args.name,
        "overrides": args.overrides,
        "command": "python -m vrft.train " + " ".join(args.overrides),
        "env": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "bitsandbytes": __import__("bitsandbytes").__version__,
        },
    }
    engines = [e for e in args.speed.split(",") if e]
    phase_probe = None
    if args.phase_stats or args.trace_rollout:
        phase_probe = {"trace": args.trace_rollout, "steps": int(cfg.trainer.max_steps)}
    profiled = [e for e in args.profile.split(",") if e]
    probe, module = StepProbe(engines, args.speed_tokens, profiled, phase_probe), None
    start = time.perf_counter()
    try:
        from vrft import setup as setup_module

        build = setup_module.build_trainer
        setup_module.build_trainer = lambda c, p, extra=None, **kw: build(c, p, [*(extra or []), probe], **kw)
        trainer, module, summary = fit(cfg)
        record["weights_gb"] = (summary.summary.get("precision_details") or {}).get("weight_bytes", 0) / 2**30
    except Exception as error:  # an OOM is a result too
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["setup_and_train_seconds"] = time.perf_counter() - start
    record["steps"] = probe.steps
    record["config"] = settings(cfg, module if "error" not in record else None)
    record["measured"] = measured(probe.steps)
    record["plan"] = plan_record(cfg, record["config"]["prompt_tokens"], record["config"]["image_tokens"])
    record["speed"], record["agreement"], record["profile"] = probe.speed, probe.agreement, probe.profile
    record["concurrent_rows"] = args.concurrent
    if probe.phases is not None:
        record["phase_stats"] = probe.phases.records
        record["rollout_trace"] = probe.phases.rollout_trace
    args.out.write_text(json.dumps(record, indent=2))
    print(
        json.dumps({k: record.get(k) for k in ("name", "measured", "plan", "speed", "error")}, default=str)[
            :3000
        ]
    )


if __name__ == "__main__":
    main()
