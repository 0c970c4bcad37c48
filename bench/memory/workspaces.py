"""What the CUDA libraries keep allocated in PyTorch's pool after first use: the allocated bytes that a bf16
matmul, a cuBLASLt matmul with bias, and a backward (autograd's own thread) leave beyond their outputs.
The planner's `Calibration.kept_workspaces_gb` stands for these (bench/rollout/results.md).

    python bench/memory/workspaces.py
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

MIB = 2**20


def main() -> None:
    device = torch.device("cuda")
    x = torch.randn(256, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(4096, device=device, dtype=torch.bfloat16)
    start = torch.cuda.memory_allocated(device)
    steps = []

    def kept(name: str, outputs: int) -> None:
        torch.cuda.synchronize(device)
        now = torch.cuda.memory_allocated(device)
        steps.append((name, (now - start - outputs) / MIB))

    y = x @ w.detach().T
    kept("x @ w^T (cuBLAS)", y.numel() * 2)
    z = F.linear(x, w.detach(), bias)
    kept("+ F.linear with bias (cuBLASLt)", (y.numel() + z.numel()) * 2)
    loss = F.linear(x, w).float().sum()
    loss.backward()
    kept("+ a backward", (y.numel() + z.numel()) * 2 + w.numel() * 2 + 4)
    print(torch.cuda.get_device_name(device), torch.__version__)
    for name, mib in steps:
        print(f"{name}: {mib:.1f} MiB kept beyond the outputs")


if __name__ == "__main__":
    main()
