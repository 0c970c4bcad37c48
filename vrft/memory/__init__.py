"""Memory engineering for one-GPU GRPO: allocator settings, the peak-memory planner, phase-tagged OOM
handling, and the fast rollout engines."""
