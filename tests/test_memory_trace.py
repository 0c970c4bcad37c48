"""The tools that explain a measured peak (bench/memory/memory_trace.py, bench/rollout/step_ab.py), on
hand-made allocator histories and clock logs: what they report is what the planner's terms are checked
against (bench/rollout/results.md, "The planner's rollout terms")."""

from datetime import datetime

import pytest

from tests.support import bench_module


def frames(name: str, line: int) -> list[dict]:
    """A stack as torch records it, innermost first: torch's own frame, then vrft's."""
    return [
        {"filename": "/venv/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
        {"filename": "/repo/vrft/rollout/static.py", "line": line, "name": name},
    ]


def test_the_peak_and_what_is_live_there():
    trace = bench_module("bench/memory/memory_trace.py")
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("cache", 10)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames("logits", 20)},
        {"action": "free_requested", "addr": 99, "size": 30},  # a block from before the trace
        {"action": "alloc", "addr": 3, "size": 70, "frames": frames("cache", 10)},  # the peak: 190
        {"action": "free_requested", "addr": 3, "size": 70},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 4, "size": 60, "frames": frames("later", 30)},  # 130: below the peak
    ]
    summary = trace.summarise({"device_traces": [events]}, start_allocated=1000)
    assert summary["peak_over_start_gb"] * 2**30 == pytest.approx(190)
    assert summary["peak_allocated_gb"] * 2**30 == pytest.approx(1190)
    assert summary["peak_at_event"] == 3
    sites = {site["site"]: (site["gb"] * 2**30, site["blocks"]) for site in summary["sites"]}
    # the torch frame is skipped for the first vrft one; the block allocated after the peak is not counted
    assert sites == {
        "vrft/rollout/static.py:10 cache": (pytest.approx(170), 2),
        "vrft/rollout/static.py:20 logits": (pytest.approx(50), 1),
    }


def test_a_phase_gets_the_clock_samples_within_its_span(tmp_path):
    step_ab = bench_module("bench/rollout/step_ab.py")
    start = datetime(2026, 12, 6, 10, 0, 0).timestamp()
    log = tmp_path / "clocks.csv"
    lines = ["timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], temp, reasons"]
    for tenth, (clock, watts) in enumerate([(1980, 100), (1900, 500), (1700, 700), (1980, 120)]):
        stamp = datetime.fromtimestamp(start + tenth * 0.2).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        lines.append(f"{stamp}, {clock}, 2619, {watts}, 40, 0x0000000000000004")
    log.write_text("\n".join(lines) + "\n")
    samples = step_ab.clock_samples(log)
    assert len(samples) == 4  # the header skipped
    # samples 1 and 2 (0.2 s and 0.4 s in) lie within the phase
    assert step_ab.during(samples, start + 0.1, start + 0.5) == (
        "1800 MHz, 600 W, throttle 0x0000000000000004 (2 samples)"
    )
    assert step_ab.during(samples, start + 5, start + 6) == "no clock sample"
