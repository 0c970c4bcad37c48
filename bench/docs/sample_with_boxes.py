"""docs/sample_detection_boxes.png: how a detection sample is drawn (truth green, prediction red).

The first synthetic detection row with objects, and an answer written here (each true box shifted by 40
units of the 0..1000 grid, plus one box on empty background), drawn by the same `vrft.visualize.draw_sample`
the sample callback uses, with the rewards computed by the task's reward classes.

    .venv/bin/python bench/docs/sample_with_boxes.py docs/sample_detection_boxes.png
"""

from __future__ import annotations

import sys

from vrft.data.synthetic import make_synthetic_dataset
from vrft.rewards import ConfidenceReward, IoUReward, format_reward
from vrft.visualize import answer_boxes, draw_sample


def main(out: str) -> None:
    rows = make_synthetic_dataset("detection", num_train=16, num_test=0, seed=0)["train"]
    row = next(r for r in rows if "No Objects" not in r["solution"])
    truth = answer_boxes(row["solution"], "detection", is_solution=True)
    predicted = [[min(1000, v + 40) for v in box] for box in truth] + [[40, 40, 200, 200]]
    listed = [{"Position": [int(v) for v in box], "Confidence": 0.9} for box in predicted[:-1]]
    listed.append({"Position": predicted[-1], "Confidence": 0.3})
    completion = f"<think>I look for the shapes of that colour.</think> <answer>{listed}</answer>"
    iou = IoUReward()([completion], [row["solution"]])[0]
    confidence = ConfidenceReward()([completion], [row["solution"]])[0]
    form = format_reward([completion], [row["solution"]])[0]
    caption = [
        f"reward {iou + confidence + form:.2f} (iou {iou:.2f} confidence {confidence:.2f} format {form:.2f})",
        f"truth: {row['solution']}",
        f"completion: {completion}",
    ]
    draw_sample(row["image"], truth, answer_boxes(completion, "detection"), "qwen2vl", caption).save(out)


if __name__ == "__main__":
    main(sys.argv[1])
