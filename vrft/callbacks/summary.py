"""`run_summary.json`: what was trained, how, and where its metrics and checkpoints are."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from vrft.models.sharded import is_sharded
from vrft.paths import write_atomic
from vrft.runtime.ranks import reduce_over_ranks

log = logging.getLogger(__name__)


class RunSummary(L.Callback):
    """Write the run summary at fit start and complete it at fit end.

    Args:
        dirpath: run folder (the file is `<dirpath>/run_summary.json`).
        info: fields known before training (config hash, model, precision name, ...).
    """

    def __init__(self, dirpath: str, info: dict | None = None):
        self.path = Path(dirpath) / "run_summary.json"
        self.summary: dict = dict(info or {})

    def write(self) -> None:
        """Write the summary (rank 0 only: one file for the run however many processes train it)."""
        if rank_zero_only.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.summary, indent=2, default=str))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.policy.parameters())
        counts = {
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params),
        }
        sharded = is_sharded(pl_module.policy)
        if sharded:  # each rank holds its shard of every parameter: the model's counts are their sum
            counts = {key: int(value) for key, value in reduce_over_ranks(trainer.strategy, counts).items()}
        self.summary.update(counts)
        plugin = trainer.precision_plugin
        if hasattr(plugin, "summary"):
            details = plugin.summary(pl_module)
            if sharded:
                # The parameter counts of the model; weight_bytes stays this rank's (what its device holds).
                details.update(
                    trainable_params=counts["trainable_parameters"], total_params=counts["total_parameters"]
                )
                details["weight_bytes_per_rank"] = True
            self.summary["precision_details"] = details
        loaded = getattr(trainer.strategy, "loaded_weight_bytes", None)
        if sharded and loaded is not None:
            # Weight bytes each rank held before sharding: rank 0 loads the base, the others receive it one
            # unit at a time (vrft.runtime.weight_sync). Each rank fills its own slot of the sum.
            ranks = range(trainer.world_size)
            held = {str(rank): float(loaded if rank == trainer.global_rank else 0) for rank in ranks}
            held = reduce_over_ranks(trainer.strategy, held)
            self.summary["loaded_weight_bytes_by_rank"] = [int(held[str(rank)]) for rank in ranks]
        self.summary["device"] = str(pl_module.device)
        logger = trainer.logger
        self.summary["metrics_dir"] = (logger.log_dir or logger.save_dir) if logger is not None else None
        for callback in trainer.checkpoint_callbacks:
            self.summary["checkpoint_dir"] = callback.dirpath
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skipped_rows"):
            self.summary["skipped_rows"] = datamodule.skipped_rows
            if any(datamodule.skipped_rows.values()):
                # at step 0, before any optimizer step: a resumed run logs it again there (metrics.csv keeps
                # one such row), not under the step it resumes at, which holds that step's metrics
                skipped = {f"data/skipped_rows_{k}": v for k, v in datamodule.skipped_rows.items()}
                for logger in trainer.loggers:
                    logger.log_metrics(skipped, step=0)
        self.write()

    def record_health(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Skipped optimizer steps and "learns nothing" warnings (counts by kind)."""
        self.summary["global_step"] = trainer.global_step
        self.summary["skipped_steps"] = getattr(trainer.precision_plugin, "skipped_steps", 0)
        health = getattr(pl_module, "health", None)
        self.summary["warnings"] = dict(health.warnings) if health is not None else {}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record_health(trainer, pl_module)
        self.summary["final_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.write()
        log.info("run summary written to %s", self.path)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A run that stopped still says how far it got and why.
        self.record_health(trainer, pl_module)
        self.summary["error"] = f"{type(exception).__name__}: {exception}"
        self.write()
