"""Three calls of `nf4_matmul`'s kernel, then three of `nf4_mma`'s, on the 7B gate projection at 16 rows:
what `device_mma.sh` points Nsight Compute at (`-k` picks the kernel, `--launch-skip 2` its third call)."""

import bitsandbytes.functional as bnb_functional
import torch

from vrft.kernels.nf4_matmul import launch_config, matmul_4bit
from vrft.kernels.nf4_mma import matmul_4bit_mma

w = torch.randn(18944, 3584, device="cuda").to(torch.bfloat16) * 0.02
packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
x = torch.randn(16, 3584, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    matmul_4bit(x, packed, state, config=launch_config(16, 18944, 3584, 64, x.device))  # its own kernel
for _ in range(3):
    matmul_4bit_mma(x, packed, state)
torch.cuda.synchronize()
