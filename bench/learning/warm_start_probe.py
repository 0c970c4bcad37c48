"""How an SFT warm start learns: its loss per step, and every `--every` steps the held-out reward of the
adapter as GRPO would see it (sampled as in the rollout, and greedy), with a few completions to read.

    python bench/learning/warm_start_probe.py --steps 400 --every 100 --out probe.json -- \
        +experiment=small_parity_grounding

The overrides after `--` compose the GRPO run whose warm start is probed (as `python -m vrft.train` takes
them). The SFT is the warm start's own (`warm_start.*`: model, LoRA, optimizer, batch, target text, data
order), run in this process without Lightning so that it can stop and measure along the way; the
measurement is the held-out check's (`vrft.callbacks.HeldOutReward.measure`). Nothing is cached.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import vrft.cli  # noqa: F401  (registers the resolvers the task configs use)
from vrft.callbacks import HeldOutReward
from vrft.modules.scoring import RewardSet
from vrft.modules.settings import GRPOSettings
from vrft.paths import config_dir
from vrft.rollout.generate import generate_rollout
from vrft.runtime.rng import isolated_rng
from vrft.warmstart import sft_run_config


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


def measured(module, grpo, rows: list[dict], samples_per_row: int, shown: int) -> dict:
    """The held-out check of the current adapter, plus `shown` sampled and greedy completions of row 0."""
    view = SimpleNamespace(
        policy=module.policy,
        processor=module.processor,
        prompt_template=module.prompt_template,
        device=module.device,
        settings=GRPOSettings(**grpo.settings),
        eval_max_new_tokens=grpo.settings["max_new_tokens"],
        rewards=grpo.rewards,
        evaluator=grpo.evaluator,
    )
    check = HeldOutReward(max_rows=len(rows), samples_per_row=samples_per_row)
    metrics = check.measure(view, rows)
    settings = view.settings
    sampling = dict(
        do_sample=True, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=0
    )
    greedy = dict(do_sample=False, max_new_tokens=settings.max_new_tokens)
    module.policy.eval()
    args = (module.policy, module.processor, rows[:1], module.prompt_template)
    with isolated_rng():  # as the check itself: the SFT run does not depend on when it is measured
        torch.manual_seed(0)
        examples = {
            "solution": rows[0]["solution"],
            "sampled": generate_rollout(*args, shown, sampling, module.device).completions,
            "greedy": generate_rollout(*args, 1, greedy, module.device).completions[0],
        }
    module.policy.train()
    return {**metrics, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, required=True, help="SFT optimizer steps")
    parser.add_argument("--every", type=int, required=True, help="measure every this many steps")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows measured")
    parser.add_argument("--samples", type=int, default=2, help="sampled completions per held-out row")
    parser.add_argument(
        "--out", type=Path, required=True, help="JSON: the loss per step and each measurement"
    )
    parser.add_argument("overrides", nargs="*", help="overrides of the GRPO run (after --)")
    args = parser.parse_args()
    cfg = compose_run(args.overrides)
    with tempfile.TemporaryDirectory() as folder:
        sft = sft_run_config(cfg, Path(folder))
    L.seed_everything(sft.seed, workers=True)
    datamodule = instantiate(sft.data)
    datamodule.setup("fit")
    module = instantiate(sft.algorithm, _convert_="object")
    module.build_policy(torch.float32)
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = instantiate(sft.optimizer)(trainable)
    grpo = SimpleNamespace(
        settings={k: v for k, v in cfg.algorithm.items() if k in GRPOSettings.__dataclass_fields__},
        rewards=RewardSet(instantiate(cfg.task.rewards)),
        evaluator=instantiate(cfg.task.evaluator),
    )
    held_out = HeldOutReward(max_rows=args.rows).rows(SimpleNamespace(datamodule=datamodule))
    report: dict = {
        "overrides": args.overrides,
        "held_out": {"rows": args.rows, "samples_per_row": args.samples},
        "warm_start": {"lr": sft.optimizer.lr, "batch_size": sft.algorithm.batch_size},
        "loss": [],
        "checks": [],
    }
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for rows in datamodule.train_dataloader():
            loss, _ = module.sft_loss(rows)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, sft.algorithm.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, grad_norm = float(loss.detach()), float(grad_norm)
            report["loss"].append({"step": step, "loss": loss, "grad_norm": grad_norm})
            print(f"step {step}: loss {loss:.3f} grad norm {grad_norm:.2f}", flush=True)
            if step % args.every == 0 or step == args.steps:
                check = {"step": step, **measured(module, grpo, held_out, args.samples, 4)}
                check["seconds"] = time.perf_counter() - start
                report["checks"].append(check)
                print(json.dumps(check, indent=1), flush=True)
                args.out.write_text(json.dumps(report, indent=1))
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
