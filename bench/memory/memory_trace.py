"""What a phase holds at its peak: torch's allocator history of one phase, replayed to the moment it held the
most, its live blocks grouped by the code that allocated them.

Why: the planner's phase terms are formulas (vrft/planner/estimator.py); where a measured peak exceeds the
plan, the peak phase's allocations say which term is short. `torch.cuda.memory._record_memory_history`
records every allocation and free with its Python stack; its own viewer (pytorch.org/memory_viz) draws them
but does not tell which live blocks make up the peak, which is what a planner term is compared with.

    with phase_trace() as trace:           # around the phase (CUDA)
        ...
    summary = summarise(trace.snapshot)    # JSON-able: peak over the start, blocks by allocating frame
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

GIB = 2**30
OWN_CODE = ("/vrft/", "/transformers/", "/bitsandbytes/", "/peft/")


@dataclass
class Trace:
    start_allocated: int = 0
    snapshot: dict = field(default_factory=dict)


@contextmanager
def phase_trace(max_entries: int = 400_000):
    """Records the allocator's history while the block runs; `.snapshot` holds it afterwards."""
    import torch

    trace = Trace(start_allocated=torch.cuda.memory_allocated())
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        yield trace
    finally:
        trace.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)


def _site(frames: list[dict]) -> str:
    """The allocating code: the innermost frame in vrft, transformers, bitsandbytes or peft (else the
    innermost), with the vrft frame that led there when the first is a library's."""
    named = [f for f in frames if any(part in f.get("filename", "") for part in OWN_CODE)]
    if not named:
        named = frames[:1]
    if not named:
        return "(no stack)"

    def label(frame: dict) -> str:
        path = frame["filename"]
        for part in OWN_CODE:
            if part in path:
                path = part.strip("/") + "/" + path.split(part, 1)[1]
                break
        return f"{path}:{frame['line']} {frame['name']}"

    inner = label(named[0])
    own = next((f for f in named if "/vrft/" in f["filename"]), None)
    return inner if own is None or own is named[0] else f"{inner} <- {label(own)}"


def summarise(snapshot: dict, start_allocated: int = 0, top: int = 25) -> dict:
    """The traced phase's peak of allocated bytes over its start (`start_allocated`, what was live before
    the trace), and the blocks live at that moment that the trace saw allocated, by allocating site."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    live: dict[int, tuple[int, int]] = {}  # address -> (size, event index)
    current = peak = 0
    peak_index = -1
    for index, event in enumerate(events):
        action, size = event.get("action"), int(event.get("size", 0))
        if action == "alloc":
            live[event["addr"]] = (size, index)
            current += size
            if current > peak:
                peak, peak_index = current, index
        elif action == "free_requested":  # blocks allocated before the trace are freed too
            live.pop(event.get("addr"), None)
            current -= size
    # the live set at the peak: replay up to it
    at_peak: dict[int, int] = {}
    for index, event in enumerate(events[: peak_index + 1]):
        if event.get("action") == "alloc":
            at_peak[event["addr"]] = index
        elif event.get("action") == "free_requested":
            at_peak.pop(event.get("addr"), None)
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for index in at_peak.values():
        event = events[index]
        entry = sites[_site(event.get("frames", []))]
        entry[0] += int(event["size"])
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])
    return {
        "events": len(events),
        "start_allocated_gb": start_allocated / GIB,
        "peak_over_start_gb": peak / GIB,
        "peak_allocated_gb": (start_allocated + peak) / GIB,
        "peak_at_event": peak_index,
        "sites": [{"site": site, "gb": size / GIB, "blocks": count} for site, (size, count) in ranked[:top]],
        "other_sites_gb": sum(size for _, (size, _) in ranked[top:]) / GIB,
    }
