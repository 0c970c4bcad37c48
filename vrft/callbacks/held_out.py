"""The held-out reward check: the task's reward on held-out rows before and after fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from vrft.callbacks.progress import progress_task
from vrft.data.datamodule import RowDataset
from vrft.data.loading import load_visual_rft
from vrft.paths import write_atomic
from vrft.precision import merge_and_requantize
from vrft.rollout.engines import build_rollout_engine
from vrft.rollout.generate import generate_rollout
from vrft.runtime.rng import isolated_rng


class HeldOutReward(L.Callback):
    """The task's reward on held-out rows before and after fit: the evidence that GRPO learned.

    At fit start and end the policy samples `samples_per_row` completions (the GRPO rollout: same temperature
    and length) for each of the first `max_rows` rows of `split`, and one greedy completion for the task's
    evaluator. Both are printed with the first and last `train/reward`, kept in `self.results` and written to
    `<dirpath>/held_out.json`, after each measurement (a run stopped during the last one keeps the others).
    With `measure_merged`, the end also scores the deployed model: each adapter merged into its base and
    quantised again with the run's scheme (`merge_and_requantize`), the figure that shows what
    quantisation-aware training buys. Sampling happens under a forked RNG, so the check does not change the
    training run.

    Args:
        split: split of the run's dataset to score (it must not be the training split to mean anything).
        max_rows: rows scored.
        samples_per_row: sampled completions per row.
        batch_size: rows per generation call.
        dirpath: folder of `held_out.json` (None: not written).
        measure_merged: also score the merged, re-quantised model at the end (a copy: the run is unchanged).
        rollout_engine: how completions are generated (`vrft.rollout.engines`). None: plain `generate` on the
            training-time model, exactly the policy as trained. `bf16_copy` / `dequant` decode the same weights
            with a static KV cache and a CUDA graph, many times faster on a GPU (bitsandbytes' LLM.int8
            `generate` is the slowest); int8 layers then multiply bf16 inputs by their dequantised weight,
            without LLM.int8's int8 rounding of the inputs.
    """

    def __init__(
        self,
        split: str = "test",
        max_rows: int = 64,
        samples_per_row: int = 2,
        batch_size: int = 16,
        dirpath: str | None = None,
        measure_merged: bool = False,
        rollout_engine: str | None = None,
    ):
        self.split = split
        self.max_rows = max_rows
        self.samples_per_row = samples_per_row
        self.batch_size = batch_size
        self.dirpath = dirpath
        self.measure_merged = measure_merged
        self.rollout_engine = rollout_engine
        self.engine = build_rollout_engine(rollout_engine) if rollout_engine else None
        self.results: dict[str, dict[str, float]] = {}
        self.before_step = 0  # the optimizer step "before" was measured at (a resumed run's checkpoint)
        self.start_step = 0  # the step this run started from (a resumed run's checkpoint)
        self._train_rewards: list[float] = []

    def rows(self, trainer: L.Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        dataset = load_visual_rft(datamodule.dataset_path())
        if self.split not in dataset:
            raise ValueError(
                f"warm_start.callbacks: split '{self.split}' is not in the dataset (splits: {list(dataset)}); "
                "set its split to a held-out split"
            )
        table = dataset[self.split]
        rows = RowDataset(table, list(range(min(self.max_rows, len(table)))))
        return [rows[i] for i in range(len(rows))]

    def measure(self, module, rows: list[dict]) -> dict[str, float]:
        """Mean sampled reward per reward name (and total), and the evaluator's metrics on greedy answers."""
        settings = module.settings
        sampling = dict(
            do_sample=True,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
        )
        greedy = dict(do_sample=False, max_new_tokens=module.eval_max_new_tokens)
        sums: dict[str, float] = {}
        count = 0
        greedy_completions: list[str] = []
        was_training = module.policy.training
        module.policy.eval()
        bar = progress_task(getattr(module, "_trainer", None), f"held-out {self.split}", len(rows))
        with isolated_rng(), bar as advance:
            torch.manual_seed(0)  # the same samples before and after for an unchanged policy
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                args = (module.policy, module.processor, batch, module.prompt_template)
                sampled = generate_rollout(*args, self.samples_per_row, sampling, module.device, self.engine)
                repeated = [row for row in batch for _ in range(self.samples_per_row)]
                columns = {k: [r[k] for r in repeated] for k in repeated[0] if k not in ("image", "solution")}
                total, per_reward = module.rewards(
                    sampled.completions, [r["solution"] for r in repeated], columns
                )
                for name, values in {**per_reward, "total": total}.items():
                    sums[name] = sums.get(name, 0.0) + float(values.sum())
                count += len(repeated)
                greedy_completions += generate_rollout(
                    *args, 1, greedy, module.device, self.engine
                ).completions
                advance(len(batch))
        module.policy.train(was_training)
        metrics = {f"reward/{name}": value / count for name, value in sums.items()}
        if module.evaluator is not None:
            for key, value in module.evaluator(greedy_completions, rows).items():
                metrics[f"greedy/{key}"] = float(value)
        return metrics

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "rewards"):
            return  # an algorithm without rewards (SFT): nothing to compare
        self._rows = self.rows(trainer)
        self.start_step = trainer.global_step
        earlier = self.earlier_before(trainer.global_step)
        if earlier is not None:
            self.results["before"], self.before_step = earlier
        else:
            # The precision plugin's autocast, as in validation: quantised and bf16 bases compute as in training.
            with trainer.precision_plugin.forward_context():
                self.results["before"] = self.measure(pl_module, self._rows)
            self.before_step = trainer.global_step
        self.write(trainer)

    def earlier_before(self, step: int) -> tuple[dict[str, float], int] | None:
        """A run resumed into its own folder (at `step` > 0) keeps the "before" that the run it resumes
        measured there (`held_out.json`, same split, rows and engine) and its step: measured anew, "before"
        would be the checkpoint's policy, and the earlier measurement before GRPO would be overwritten."""
        path = Path(self.dirpath) / "held_out.json" if self.dirpath is not None else None
        if step == 0 or path is None or not path.is_file():
            return None
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            return None
        same = dict(split=self.split, rows=len(self._rows), rollout_engine=self.rollout_engine or "hf")
        before, before_step = earlier.get("before"), earlier.get("before_step", 0)
        if any(earlier.get(k) != v for k, v in same.items()) or not isinstance(before, dict):
            return None
        return (before, before_step) if isinstance(before_step, int) and before_step <= step else None

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        reward = trainer.callback_metrics.get("train/reward")
        step = trainer.global_step
        if reward is not None and step > len(self._train_rewards):
            self._train_rewards.append(float(reward))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "before" not in self.results:
            return
        if self._train_rewards:
            self.results["train"] = {"first": self._train_rewards[0], "last": self._train_rewards[-1]}
        with trainer.precision_plugin.forward_context():
            self.results["after"] = self.measure(pl_module, self._rows)
            self.write(trainer)
            if self.measure_merged:
                self.results["merged"] = self.measure_deployed(pl_module)
                self.write(trainer)
        if trainer.is_global_zero:
            print(self.report())

    def write(self, trainer: L.Trainer) -> None:
        """`<dirpath>/held_out.json` with the measurements so far (rank 0; nothing without `dirpath`)."""
        if self.dirpath is None or not trainer.is_global_zero:
            return
        path = Path(self.dirpath) / "held_out.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {
            "split": self.split,
            "rows": len(self._rows),
            "rollout_engine": self.rollout_engine or "hf",
        }
        if self.before_step:
            settings["before_step"] = self.before_step
        write_atomic(path, json.dumps({**settings, **self.results}, indent=2))

    def measure_deployed(self, module) -> dict[str, float]:
        """`measure` on a merged, re-quantised copy of the policy (the model a user would deploy)."""
        trained = module.policy
        module.policy = merge_and_requantize(trained)
        try:
            return self.measure(module, self._rows)
        finally:
            module.policy = trained

    def report(self) -> str:
        """The before/after table as text."""
        before, after = self.results["before"], self.results["after"]
        merged = self.results.get("merged")
        # a run resumed in another folder measured "before" at its checkpoint, not before GRPO
        start = "before" if self.before_step == 0 else f"step {self.before_step}"
        lines = [
            f"\nheld-out '{self.split}' ({len(self._rows)} rows; sampled x{self.samples_per_row}, and greedy):",
            f"  {'metric':<22}{start:>8}{'after':>8}{'change':>9}" + (f"{'merged':>9}" if merged else ""),
        ]
        for key in before:
            line = f"  {key:<22}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}"
            lines.append(line + (f"{merged[key]:>9.3f}" if merged else ""))
        train = self.results.get("train")
        resumed = f" of this run, from step {self.start_step + 1}" if self.start_step else ""
        if train:
            lines.append(
                f"  {'train/reward':<22}{train['first']:>8.3f}{train['last']:>8.3f}"
                f"{train['last'] - train['first']:>+9.3f}  (first and last optimizer step{resumed})"
            )
        return "\n".join(lines)
