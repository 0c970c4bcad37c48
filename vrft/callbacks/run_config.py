"""What a run is, for the dashboards: config, hardware, precision and plan as hyperparameters; results as summary.

Lightning hands `log_hyperparams` to every logger: W&B stores it as the run config, TensorBoard as the HPARAMS
tab (vrft adds the resolved YAML as a text entry, which is easier to read there), CSV as `logs/hparams.yaml`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override


def flat_results(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """`{"after": {"reward/total": 1.2}}` -> `{"<prefix>/after/reward/total": 1.2}`."""
    return {
        f"{prefix}/{stage}/{key}": float(value)
        for stage, row in results.items()
        for key, value in row.items()
    }


class RunConfigLogging(L.Callback):
    """Log the run's description at fit start and its final results at fit end, to every logger.

    Args:
        config: the resolved run config (`config` in the hyperparameters).
        plan: the planner's prediction (`vrft.train.planner_prediction`).
    """

    def __init__(self, config: DictConfig, plan: dict | None = None):
        self.config = OmegaConf.to_container(config, resolve=True)
        self.plan = plan or {}

    def hyperparameters(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        plugin = trainer.precision_plugin
        precision = plugin.summary(pl_module) if hasattr(plugin, "summary") else {}
        return {
            "config": self.config,
            "hardware": self.config.get("hw", {}),
            "precision": precision,
            "plan": self.plan,
        }

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self.hyperparameters(trainer, pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and "device_gb" in self.plan:
                # TensorBoard's HPARAMS tab needs a metric: the planner's predicted memory is known now.
                logger.log_hyperparams(params, metrics={"plan/device_gb": self.plan["device_gb"]})
            else:
                logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                text = OmegaConf.to_yaml(OmegaConf.create(params))
                logger.experiment.add_text("config", f"```\n{text}\n```", 0)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = {f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()}
        for callback in trainer.callbacks:
            results = getattr(callback, "results", None)  # the held-out check (before / after / merged)
            if isinstance(results, dict) and results:
                final.update(flat_results(results, "held_out"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(final)
            elif isinstance(logger, TensorBoardLogger):
                logger.log_metrics(final, step=trainer.global_step)
