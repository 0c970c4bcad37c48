"""The one run-setup path of every vrft command: config -> seed -> data module -> policy module -> precision
plugin -> Lightning trainer. Training, the SFT warm start and evaluation all build their run here, so a
setting means the same thing in each."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from vrft.distributed import strategy_name
from vrft.loggers import run_trainer_settings
from vrft.precision.fsdp import fsdp_precision_config
from vrft.runtime.checkpoint_io import AtomicCheckpointIO
from vrft.runtime.sharding import PolicyFSDPStrategy


@dataclass
class Run:
    """The objects of one run, built from its config and ready for `trainer.fit` / `trainer.validate`."""

    cfg: DictConfig
    precision: L.pytorch.plugins.Precision
    datamodule: L.LightningDataModule
    module: L.LightningModule
    trainer: L.Trainer


def build_trainer(
    cfg: DictConfig,
    precision,
    extra_callbacks: list | None = None,
    config_callbacks: bool = True,
    logger: bool = True,
    **trainer_overrides,
) -> L.Trainer:
    """The Lightning trainer of a run: precision plugin, callbacks and logger from the config.

    `config_callbacks=False` / `logger=False` leave out the config's callbacks / logger (evaluation);
    `trainer_overrides` replace `cfg.trainer` keys.
    """
    callbacks = (
        [instantiate(node) for node in (cfg.get("callbacks") or {}).values()] if config_callbacks else []
    )
    callbacks += extra_callbacks or []
    settings = run_trainer_settings(cfg) if logger else {"logger": False}
    if strategy_name(cfg.trainer) == "fsdp":
        # Lightning's FSDPStrategy with the policy as the FSDP root (vrft.runtime.sharding); an instance, not
        # the string, also because Lightning refuses the string "fsdp" on the CPU, where gloo runs it.
        settings["strategy"] = PolicyFSDPStrategy()
    # Checkpoints are written beside their destination, fsynced and renamed (vrft.runtime.checkpoint_io).
    return instantiate(
        cfg.trainer,
        plugins=[precision, AtomicCheckpointIO()],
        callbacks=callbacks,
        **{**settings, **trainer_overrides},
    )


def build_run(
    cfg: DictConfig,
    extra_callbacks: list | None = None,
    data_overrides: dict | None = None,
    **trainer_options,
) -> Run:
    """Seed, then build the data module, the policy module, the precision plugin and the trainer of `cfg`.

    `data_overrides` replace `cfg.data` keys (evaluation picks its split); `trainer_options` go to
    `build_trainer`.
    """
    L.seed_everything(cfg.seed, workers=True)
    sharded = strategy_name(cfg.trainer) == "fsdp"
    # FSDPStrategy takes only an FSDPPrecision: the plugin's FSDP form, same arguments (vrft.precision.fsdp).
    precision = instantiate(fsdp_precision_config(cfg.precision) if sharded else cfg.precision)
    module = instantiate(cfg.algorithm, _convert_="object")
    # The data module refuses, at setup and before the model loads, a row whose prompt would not fit the
    # model's context: it asks the module, which owns the processor and the completion budget.
    overrides = {"prompt_budget": module.prompt_budget, **(data_overrides or {})}
    datamodule = instantiate(cfg.data, **overrides)
    trainer = build_trainer(cfg, precision, extra_callbacks, **trainer_options)
    return Run(cfg=cfg, precision=precision, datamodule=datamodule, module=module, trainer=trainer)
