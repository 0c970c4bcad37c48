"""Lightning callbacks of a vrft run."""

from vrft.callbacks.adapter import AdapterExport
from vrft.callbacks.checkpoint import Checkpoints
from vrft.callbacks.curves import CurvesPlot
from vrft.callbacks.held_out import HeldOutReward
from vrft.callbacks.progress import StepProgressBar
from vrft.callbacks.resume import RunSettingsInCheckpoint
from vrft.callbacks.run_config import RunConfigLogging
from vrft.callbacks.samples import CompletionSamples
from vrft.callbacks.summary import RunSummary

__all__ = [
    "AdapterExport",
    "Checkpoints",
    "CompletionSamples",
    "CurvesPlot",
    "HeldOutReward",
    "RunConfigLogging",
    "RunSettingsInCheckpoint",
    "RunSummary",
    "StepProgressBar",
]
