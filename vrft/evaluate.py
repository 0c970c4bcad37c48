"""`python -m vrft.evaluate`: greedy decoding on a split, the metric Visual-RFT reports, JSON out.

Detection: COCO bbox mAP (IoU .50:.95 and .50) with the model's confidence as score; classification:
accuracy with the reward's matching rule; grounding: mean IoU. Writes `predictions.json` and `metrics.json`
to the run folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from vrft.cli import user_errors
from vrft.paths import config_dir
from vrft.setup import build_run

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the model (+ adapter or checkpoint) of `cfg` on `cfg.split`; returns the metrics."""
    run_dir = Path(cfg.run_dir)
    with open_dict(cfg):
        cfg.lora.init_adapter = cfg.adapter
    run = build_run(
        cfg,
        data_overrides={"val_split": cfg.split, "max_val_rows": cfg.max_rows},
        config_callbacks=False,
        logger=False,
        limit_val_batches=None,
    )
    trainer, module, precision = run.trainer, run.module, run.precision
    trainer.validate(module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path, verbose=False)
    metrics = {
        k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "predictions.json").write_text(json.dumps(module.predictions, indent=1, default=str))
    report = {
        "metrics": metrics,
        "task": cfg.task.name,
        "model": cfg.model.name_or_path,
        "adapter": cfg.adapter,
        "ckpt_path": cfg.ckpt_path,
        "split": cfg.split,
        "rows": len(module.predictions),
        "precision": getattr(precision, "name", type(precision).__name__),
    }
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"\n{cfg.task.name} on split '{cfg.split}' ({len(module.predictions)} rows):")
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}")
    print(f"predictions and metrics: {run_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point of `python -m vrft.evaluate`."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
