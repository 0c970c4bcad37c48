"""Phase tracking, allocator settings and the frozen vision tower (CPU: the CUDA parts are no-ops)."""

import pytest
import torch

from vrft.models.frozen import run_without_autograd
from vrft.runtime.cuda import ALLOCATOR_SETTING, apply_memory_cap, configure_allocator
from vrft.runtime.phases import PhaseTracker


def test_tracker_names_the_running_phase_and_keeps_it_on_error():
    tracker = PhaseTracker()
    with tracker("rollout", torch.device("cpu")):
        assert tracker.current == "rollout"
    assert tracker.current is None and "rollout" in tracker.peaks
    with pytest.raises(RuntimeError), tracker("update", torch.device("cpu")):
        raise RuntimeError("boom")
    assert tracker.current == "update"  # what the OOM handler reads
    assert set(tracker.metrics()) == {"memory/rollout_allocated_gb", "memory/rollout_reserved_gb"}


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    configure_allocator()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_SETTING
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_memory_cap_is_a_no_op_without_cuda_or_cap():
    assert apply_memory_cap(None) is None
    if not torch.cuda.is_available():
        assert apply_memory_cap(24) is None


def test_frozen_module_records_no_graph_even_with_trainable_weights():
    tower = torch.nn.Linear(4, 4)
    run_without_autograd(tower)
    out = tower(torch.randn(2, 4))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.gpu
def test_memory_cap_limits_reserved_memory():
    apply_memory_cap(1)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    apply_memory_cap(10_000)
