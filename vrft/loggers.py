"""The loggers of a run (`logger=...`: CSV always, W&B and TensorBoard on request) and the trainer settings
that follow from the config rather than from `conf/trainer/`."""

from __future__ import annotations

from hydra.utils import instantiate
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Every logger under `cfg.logger` (a name -> node mapping, or one node with a `_target_`), CSV first.

    CSV comes first because Lightning's `trainer.logger` (the first) is where `run_summary.json` points for
    metrics, and `metrics.csv` is what `python -m vrft.report` reads.
    """
    nodes = cfg.get("logger") or {}
    if "_target_" in nodes:
        nodes = {"logger": nodes}
    loggers = [instantiate(node) for node in nodes.values() if node]
    return sorted(loggers, key=lambda logger: not isinstance(logger, CSVLogger))


def run_trainer_settings(cfg: DictConfig) -> dict:
    """Trainer arguments that come from the rest of the config: the loggers, and no empty validation loop."""
    settings: dict = {"logger": build_loggers(cfg) or False}
    if cfg.data.get("val_split") is None and cfg.trainer.get("limit_val_batches") is None:
        # Without a validation split the loop has nothing to run; Lightning would warn that its data is empty.
        settings["limit_val_batches"] = 0
    return settings


class WandbLogger(lightning_loggers.WandbLogger):
    """Lightning's `WandbLogger` without its `anonymous=None` argument.

    Lightning always passes `anonymous` to `wandb.init`; wandb 0.31 deprecated the setting and warns on any
    value, `None` included, in every run. Dropping the key is what a run without `anonymous` would send.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
