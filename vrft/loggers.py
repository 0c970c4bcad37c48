"""The loggers of a run (`logger=...`: CSV always, W&B and TensorBoard on request) and the trainer settings
that follow from the config rather than from `conf/trainer/`."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from typing_extensions import override

from vrft.paths import write_atomic


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Every logger under `cfg.logger` (a name -> node mapping, or one node with a `_target_`), CSV first.

    CSV comes first because Lightning's `trainer.logger` (the first) is where `run_summary.json` points for
    metrics, and `metrics.csv` is what `python -m vrft.report` reads.
    """
    loggers = [instantiate(node) for node in _logger_nodes(cfg)]
    return sorted(loggers, key=lambda logger: not isinstance(logger, lightning_loggers.CSVLogger))


def _logger_nodes(cfg: DictConfig) -> list[DictConfig]:
    """The logger nodes of `cfg.logger`: a name -> node mapping (`logger=[wandb,tensorboard]`), or one node
    with a `_target_`; the empty ones left out."""
    nodes = cfg.get("logger") or {}
    if "_target_" in nodes:
        nodes = {"logger": nodes}
    return [node for node in nodes.values() if node]


# WANDB_MODE values under which wandb never asks for credentials
WANDB_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def check_wandb_login(cfg: DictConfig) -> None:
    """Where the run logs to W&B online, find its credentials now, before a warm start or the model load.

    Without this, wandb looks for them when the logger first starts its run, inside the trainer's setup,
    and a job without a terminal stops there with wandb's `UsageError` and the trace through Lightning.
    `wandb.login` is wandb's own lookup (WANDB_API_KEY, the netrc, `wandb login`'s settings): at a
    terminal it asks for a key as `wandb.init` would; elsewhere it raises, and the message says the fixes.
    `verify=False`: no request to the server.
    """
    online = [
        node
        for node in _logger_nodes(cfg)
        if str(node.get("_target_", "")).endswith("WandbLogger") and not node.get("offline")
    ]
    if not online or os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE_MODES:
        return
    import wandb  # only runs that log to W&B pay for its import

    try:
        wandb.login(verify=False)
    except wandb.errors.Error as error:
        raise ValueError(
            f"logger=wandb found no W&B credentials ({error}); run `wandb login` or set WANDB_API_KEY, or log "
            "offline with WANDB_MODE=offline and upload later with `wandb sync <run>/wandb/offline-run-*`"
        ) from None


def run_trainer_settings(cfg: DictConfig) -> dict:
    """Trainer arguments that come from the rest of the config: the loggers, and no empty validation loop."""
    settings: dict = {"logger": build_loggers(cfg) or False}
    if cfg.data.get("val_split") is None and cfg.trainer.get("limit_val_batches") is None:
        # Without a validation split the loop has nothing to run; Lightning would warn that its data is empty.
        settings["limit_val_batches"] = 0
    return settings


class WandbLogger(lightning_loggers.WandbLogger):
    """Lightning's `WandbLogger`, except that a run resumed into its own folder (`ckpt_path=` with the same
    `hydra.run.dir`) goes on in the same W&B run, and without Lightning's `anonymous=None` argument.

    The W&B run's id is kept in `<save_dir>/wandb/vrft-run-id` when the run starts; a run that resumes a
    checkpoint in that folder passes it to `wandb.init` (`id=`, with Lightning's `resume="allow"`). Without it
    each resume started a new W&B run: the curves split into one run per resume. A fresh run in the folder
    (`check_fresh_run` lets one start where the earlier run stopped before its first checkpoint, which left
    an id) starts a W&B run of its own, whose id replaces the earlier one: it joined the earlier W&B run,
    two runs' curves in one. An `id` given (`+logger.wandb.id=...`) is kept.

    Lightning always passes `anonymous` to `wandb.init`; wandb 0.31 deprecated the setting and warns on any
    value, `None` included, in every run. Dropping the key is what a run without `anonymous` would send.

    Args:
        resume_from: the checkpoint this run resumes (`ckpt_path`, which the config passes); None for a fresh
            run. Only a resumed run goes on in the W&B run of `<save_dir>/wandb/vrft-run-id`.
        *args, **kwargs: Lightning's `WandbLogger` arguments (the ones it does not take go to `wandb.init`).
    """

    def __init__(self, *args, resume_from: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        self.resuming = resume_from is not None
        if self._wandb_init.get("id") is None and self.resuming:
            self._id = self._wandb_init["id"] = self.earlier_run_id()

    @property
    def run_id_file(self) -> Path:
        """Where this folder's W&B run id is kept, beside the folders wandb writes (`<save_dir>/wandb`)."""
        return Path(self._save_dir or ".") / "wandb" / "vrft-run-id"

    def earlier_run_id(self) -> str | None:
        """The id of the W&B run an earlier run in this folder logged to; None where none did."""
        path = self.run_id_file
        return (path.read_text().strip() or None) if path.is_file() else None

    @property
    @override
    @rank_zero_experiment
    def experiment(self):
        started = self._experiment is not None
        experiment = super().experiment
        if started:
            return experiment
        # the id wandb chose, or the earlier run's it resumed; WANDB_MODE=disabled's stand-in run logs nowhere
        if not getattr(experiment, "disabled", False):
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_id_file, f"{experiment.id}\n")
        elif not self.resuming:
            # the earlier run's id would outlive this fresh run, and a resume of this run's checkpoints join it
            self.run_id_file.unlink(missing_ok=True)
        return experiment


class _KeepEarlierRowsWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, keeping the rows an earlier run in the same folder wrote before this
    run's first step."""

    _earlier: list[dict] | None = None  # the rows metrics.csv held when this writer started

    @override
    def _check_log_dir_exists(self) -> None:
        # Lightning warns and deletes metrics.csv here; read instead, and rewritten at the first save.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self._earlier = list(csv.DictReader(file))

    @override
    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            # Step 0 holds what a run logs before its first optimizer step (the rows data.on_bad_row=skip
            # dropped), a resumed run too: it says nothing about which steps are trained again, so the merge
            # waits for the first optimizer step's row, and the new step-0 rows replace the earlier ones.
            trained = [row["step"] for row in self.metrics if row["step"] > 0]
            if not trained:
                return  # kept in self.metrics, written with the first step's row
            # Rows at or after the first new step are the steps this run trains again (a resume from an
            # earlier checkpoint, or a fresh run from step 1): the new rows replace them.
            first = min(trained)
            setup = [row for row in self.metrics if row["step"] == 0]
            kept = [row for row in self._earlier if _kept(row.get("step"), first, bool(setup))]
            kept = [{k: v for k, v in row.items() if v != ""} for row in kept]
            self.metrics = setup + kept + [row for row in self.metrics if row["step"] != 0]
            self._earlier = None
            self._fs.rm_file(self.metrics_file_path)  # written again, kept rows first, under one header
        super().save()


def _kept(step: str | None, first: int, setup_logged: bool) -> bool:
    """An earlier metrics.csv row at `step` survives a run whose first optimizer step is `first` (its step-0
    row only where this run logged none)."""
    if not step:
        return False
    return float(step) < first and (float(step) > 0 or not setup_logged)


class CSVLogger(lightning_loggers.CSVLogger):
    """Lightning's `CSVLogger`, except that a run resumed into its own folder (`ckpt_path=` with the same
    `hydra.run.dir`) keeps the rows of metrics.csv up to its checkpoint's step.

    Lightning deletes an existing metrics.csv when its writer starts, so the resumed run's curves
    (`curves.png`, `python -m vrft.report`) would begin at the checkpoint.
    """

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepEarlierRowsWriter(log_dir=self.log_dir)
        return self._experiment


class TensorBoardLogger(lightning_loggers.TensorBoardLogger):
    """Lightning's `TensorBoardLogger`, except that a run resumed into its own folder hides the events the
    earlier run wrote at and after its own first optimizer step, as metrics.csv drops those rows
    (`CSVLogger`).

    Both runs' event files sit in the one folder: TensorBoard showed both runs' points for every step trained
    again, each curve zigzagging between them. Each run writes two event files: the hyperparameters and the
    step-0 rows, then, from its first optimizer step on, one opened by `SummaryWriter(purge_step=...)`.
    """

    _earlier_hidden = False  # whether this run's first optimizer step has marked where earlier events end

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._earlier_hidden and step is not None and step > 0:
            self._hide_earlier_events_from(step)
        super().log_metrics(metrics, step)

    def _hide_earlier_events_from(self, step: int) -> None:
        # SummaryWriter(purge_step=step) starts its event file with the marker TensorBoard reads as "drop each
        # event at `step` or later read before this one": the earlier run's, whose files are named (timestamped)
        # before this one. The marker goes in at the first optimizer step, where metrics.csv's writer merges,
        # not when Lightning opens the writer at the hyperparameters: the step-0 rows come before the checkpoint,
        # and so the step it holds, has loaded. Hence a second writer, of the class Lightning chose (torch's, or
        # tensorboardX's) with the logger's options (`_kwargs`, what Lightning passes SummaryWriter).
        writer = self.experiment
        writer.close()  # this run's events so far stay, in their own file
        self._experiment = type(writer)(log_dir=writer.get_logdir(), **{**self._kwargs, "purge_step": step})
        self._earlier_hidden = True
