"""Verifiable rewards of Visual-RFT: plain callables ``fn(completions, solutions, **columns) -> list[float]``."""

from vrft.rewards.base import Reward, RewardFn, reward_name
from vrft.rewards.boxes import Box, box_giou, box_iou
from vrft.rewards.classification import (
    AccuracyReward,
    accuracy_reward,
    check_classification_solution,
    normalize_label,
)
from vrft.rewards.detection import (
    ConfidenceReward,
    DetectionReward,
    IoUReward,
    check_detection_solution,
    confidence_reward,
    iou_reward,
)
from vrft.rewards.format import FormatReward, format_reward
from vrft.rewards.grounding import GroundingReward, check_grounding_solution, grounding_reward
from vrft.rewards.parsing import Detection, extract_answer, parse_detection_answer, parse_grounding_box

__all__ = [
    "AccuracyReward",
    "Box",
    "ConfidenceReward",
    "Detection",
    "DetectionReward",
    "FormatReward",
    "GroundingReward",
    "IoUReward",
    "Reward",
    "RewardFn",
    "accuracy_reward",
    "box_giou",
    "box_iou",
    "check_classification_solution",
    "check_detection_solution",
    "check_grounding_solution",
    "confidence_reward",
    "extract_answer",
    "format_reward",
    "grounding_reward",
    "iou_reward",
    "normalize_label",
    "parse_detection_answer",
    "parse_grounding_box",
    "reward_name",
]
