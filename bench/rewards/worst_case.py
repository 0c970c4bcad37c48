"""Time every reward, and every ground-truth row check, on the inputs that used to be slow.

    python bench/rewards/worst_case.py            # writes bench/rewards/results.md

Each cell is the fastest of 5 timed calls (milliseconds per reward call, one completion); the budget
is 5 ms per call. The cases are the worst ones the issue-11 fuzz found (whitespace runs, repeated
tags, huge ground truths) plus the largest inputs the caps allow. Rewards and the data-load checks
are timed separately: a ground truth over the caps is refused when the data loads, so the rewards
never see it in a run, but they must stay linear on it anyway.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vrft.rewards import (
    AccuracyReward,
    ConfidenceReward,
    FormatReward,
    GroundingReward,
    IoUReward,
    check_classification_solution,
    check_detection_solution,
    check_grounding_solution,
)
from vrft.rewards.parsing import (
    MAX_BOXES,
    MAX_SOLUTION_BOXES,
    format_detection_answer,
    parse_detection_answer,
    parse_grounding_box,
    reference_answer,
)

BUDGET_MS = 5.0
REPEATS = 5
OUT = Path(__file__).with_name("results.md")

REWARDS = {
    "format": FormatReward(),
    "accuracy": AccuracyReward(),
    "accuracy compat": AccuracyReward(compat=True),
    "iou": IoUReward(),
    "iou compat": IoUReward(compat=True),
    "confidence": ConfidenceReward(),
    "confidence strict": ConfidenceReward(strict=True),
    "grounding": GroundingReward(),
    "grounding compat": GroundingReward(compat=True),
    "grounding strict": GroundingReward(strict=True),
}


def boxes(count: int, step: int = 3) -> list[list[int]]:
    """`count` distinct boxes on a grid (so that none is dropped as a duplicate)."""
    return [
        [(i * step) % 990, (i // 330) * step, (i * step) % 990 + 10, (i // 330) * step + 10]
        for i in range(count)
    ]


def detection_completion(count: int) -> str:
    entries = ", ".join(f"{{'Position': {box}, 'Confidence': 0.5}}" for box in boxes(count, step=7))
    return f"<think>t</think><answer>[{entries}]</answer>"


SPACES_20K, SPACES_100K = " " * 20_000, " " * 100_000
LABEL = "<answer>pink primrose</answer>"
GROUNDING = "<answer>(100,100),(200,200)</answer>"
DETECTION = format_detection_answer([[0, 0, 100, 100], [50, 50, 300, 300]])
# (case, completion, solution)
CASES = [
    ("grounding answer (1,1) + 20k spaces", f"<answer>(1,1){SPACES_20K}</answer>", GROUNDING),
    ("answer of 20k spaces", f"<answer>{SPACES_20K}</answer>", LABEL),
    ("2,500 repeated <answer> tags", "<answer>" * 2_500, LABEL),
    ("2,000 repeated </think> + spaces", "<think>" + "</think>   " * 2_000 + "</answer>", LABEL),
    ("20k '{' characters", "<answer>" + "{" * 20_000, DETECTION),
    ("'Position': [ + 20k spaces", "<answer>[{'Position': [" + SPACES_20K + "1, 2, 3, 4]}]</answer>", DETECTION),
    ("classification: 20k chars of class names", "<answer>" + "pink primrose " * 1_400 + "</answer>", LABEL),
    ("classification: 20k chars of distinct words", "<answer>" + " ".join(f"w{i}" for i in range(3_500)) + "</answer>", LABEL),
    ("ground truth (1,1) + 100k spaces", "<answer>(100,100),(200,200)</answer>", f"<answer>(1,1){SPACES_100K},(2,2)</answer>"),
    ("ground truth of 100k spaces", "<answer>daisy</answer>", f"<answer>{SPACES_100K}</answer>"),
    ("ground truth (1,1) + 15k spaces (under the cap)", "<answer>(100,100),(200,200)</answer>", f"<answer>(1,1){' ' * 15_000},(2,2)</answer>"),
    ("ground truth of 10k boxes", detection_completion(MAX_BOXES), format_detection_answer(boxes(10_000))),
    (f"{MAX_BOXES} predicted x {MAX_SOLUTION_BOXES} true boxes", detection_completion(MAX_BOXES), format_detection_answer(boxes(MAX_SOLUTION_BOXES))),
]  # fmt: skip
CHECKS: dict[str, Callable[[str], None]] = {
    "classification": check_classification_solution,
    "detection": check_detection_solution,
    "grounding": check_grounding_solution,
}
# The parsers alone on the oversized inputs the rewards no longer parse: still linear (milliseconds).
PARSER_CASES = [
    (
        "parse_grounding_box: (1,1) + 100k spaces",
        lambda: parse_grounding_box(f"(1,1){SPACES_100K},(2,2)", None),
    ),
    (
        "parse_detection_answer: 10k boxes",
        lambda: parse_detection_answer(format_detection_answer(boxes(10_000)), None, None),
    ),
    ("reference_answer: 2,500 <answer> tags", lambda: reference_answer("<answer>" * 2_500)),
]
CHECK_CASES = [
    ("ground truth (1,1) + 100k spaces", f"<answer>(1,1){SPACES_100K},(2,2)</answer>"),
    ("ground truth of 10k boxes", format_detection_answer(boxes(10_000))),
    (
        f"ground truth of {MAX_SOLUTION_BOXES} boxes (the cap)",
        format_detection_answer(boxes(MAX_SOLUTION_BOXES)),
    ),
]


def best_ms(call: Callable[[], object]) -> float:
    """Fastest of `REPEATS` calls, in milliseconds (the least disturbed by other processes)."""
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        timings.append((time.perf_counter() - start) * 1000)
    return min(timings)


def run_check(check: Callable[[str], None], solution: str) -> None:
    try:
        check(solution)
    except ValueError:
        pass  # refusing the row is the point; the time to refuse it is what is measured


def main() -> None:
    names = list(REWARDS)
    lines = [
        "# Reward worst cases (`python bench/rewards/worst_case.py`)",
        "",
        f"Milliseconds per reward call, fastest of {REPEATS}; budget {BUDGET_MS:g} ms. "
        f"Python {platform.python_version()} on {platform.machine()} ({platform.processor() or 'cpu'}).",
        "",
        "| case | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    worst = 0.0
    for case, completion, solution in CASES:
        cells = []
        for name in names:
            ms = best_ms(lambda r=REWARDS[name], c=completion, s=solution: r([c], [s]))
            worst = max(worst, ms)
            cells.append(f"{ms:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
        print(case, "done", file=sys.stderr)
    lines += [
        "",
        f"Slowest reward call: {worst:.2f} ms.",
        "",
        "## Ground-truth row checks (once per row, when the data loads)",
        "",
    ]
    lines += ["| row | " + " | ".join(CHECKS) + " |", "|---|" + "---|" * len(CHECKS)]
    for case, solution in CHECK_CASES:
        cells = [f"{best_ms(lambda c=check, s=solution: run_check(c, s)):.2f}" for check in CHECKS.values()]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Parsers alone on oversized input (rewards refuse it unparsed)",
        "",
        "| call | ms |",
        "|---|---|",
    ]
    lines += [f"| {case} | {best_ms(call):.2f} |" for case, call in PARSER_CASES]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"slowest reward call {worst:.2f} ms (budget {BUDGET_MS:g} ms); wrote {OUT}")


if __name__ == "__main__":
    main()
