"""CompletionSamples: samples.jsonl of a run resumed into its own folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

from vrft.callbacks import CompletionSamples


def test_resumed_run_drops_the_samples_of_the_steps_it_trains_again(tmp_path):
    path = tmp_path / "samples.jsonl"
    records = [{"step": step, "completion": f"c{step}"} for step in (1, 2, 3)]
    # a run killed after step 3, mid-write: its last line is cut
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "compl')
    samples = CompletionSamples(str(tmp_path), every_n_steps=1)
    samples.on_train_start(SimpleNamespace(is_global_zero=True, global_step=2), None)  # resumed at step 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
