"""Sample completions every N optimizer steps: JSONL, PNG figures, a W&B table and TensorBoard entries."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from typing_extensions import override

from vrft.paths import write_atomic
from vrft.visualize import answer_boxes, draw_sample


def _caption(sample: dict) -> list[str]:
    rewards = "  ".join(f"{name} {value:.2f}" for name, value in sample["rewards"].items())
    return [
        f"reward {sample['reward']:.2f} ({rewards})  advantage {sample['advantage']:+.2f}",
        f"truth: {sample['solution']}",
        f"completion: {sample['completion']}",
    ]


class CompletionSamples(L.Callback):
    """At the first optimizer step and every `every_n_steps` after, record the module's latest completions (`module.samples`).

    Each record goes to `<dirpath>/samples.jsonl`; each sample's image, with the ground-truth (green) and
    predicted (red) boxes of detection and grounding drawn and the completion, rewards and advantage under
    it, to `<dirpath>/samples/step-<N>-<i>.png`; to W&B as rows of one incremental table (only new rows are
    sent each time); and to TensorBoard as an image and a text entry per sample.

    Args:
        dirpath: run folder.
        every_n_steps: record samples every this many optimizer steps (and at step 1).
        task: the task name (`detection` and `grounding` get boxes drawn).
        coord_convention: how boxes are written (`qwen2vl` 0..1000 grid, or `absolute` pixels).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 10,
        task: str = "classification",
        coord_convention: str = "qwen2vl",
    ):
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / "samples.jsonl"
        self.every_n_steps = every_n_steps
        self.task = task
        self.coord_convention = coord_convention
        self._last_step = -1
        self._table = None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.path.is_file():
            self.keep_records_through(trainer.global_step)

    def keep_records_through(self, step: int) -> None:
        """Drop the records of `samples.jsonl` after `step`, where this run starts.

        A run resumed into its own folder from an earlier checkpoint (or started again there) trains those
        steps again and records their samples anew: appended, each step would appear twice. A line cut by a
        kill, which the next record would be appended to, goes too.
        """
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        write_atomic(self.path, "".join(kept))

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        samples = getattr(pl_module, "samples", None)
        due = step == 1 or step % self.every_n_steps == 0  # the first step too: a short run shows samples
        if step == self._last_step or not due or not samples or not trainer.is_global_zero:
            return
        self._last_step = step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            for sample in samples:
                record = {k: v for k, v in sample.items() if k != "image"}
                file.write(json.dumps({"step": step, **record}) + "\n")
        figures = [self.figure(sample) for sample in samples]
        folder = self.dirpath / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for index, figure in enumerate(figures):
            if figure is not None:
                figure.save(folder / f"step-{step:05d}-{index}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self.log_wandb(logger, step, samples, figures)
            elif isinstance(logger, TensorBoardLogger):
                for index, (sample, figure) in enumerate(zip(samples, figures, strict=True)):
                    if figure is not None:
                        logger.experiment.add_image(
                            f"samples/{index}", np.asarray(figure), step, dataformats="HWC"
                        )
                    logger.experiment.add_text(f"samples/{index}", "  \n".join(_caption(sample)), step)

    def figure(self, sample: dict):
        """The sample's PNG figure (None for a row without an image)."""
        if sample.get("image") is None:
            return None
        truth = answer_boxes(sample["solution"], self.task, is_solution=True)
        predicted = answer_boxes(sample["completion"], self.task)
        return draw_sample(sample["image"], truth, predicted, self.coord_convention, _caption(sample))

    def log_wandb(self, logger: WandbLogger, step: int, samples: list[dict], figures: list) -> None:
        import wandb

        names = list(samples[0]["rewards"])
        if self._table is None:
            columns = ["step", "image", "problem", "completion", "solution", "reward", *names, "advantage"]
            # INCREMENTAL: each log sends only the rows added since the last one, not the whole table again.
            self._table = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        for sample, figure in zip(samples, figures, strict=True):
            image = wandb.Image(figure) if figure is not None else None
            row = [step, image, sample["problem"], sample["completion"], sample["solution"], sample["reward"]]
            self._table.add_data(*row, *(sample["rewards"].get(n) for n in names), sample["advantage"])
        logger.log_metrics({"samples": self._table}, step=step)
