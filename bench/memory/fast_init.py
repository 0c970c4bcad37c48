"""Architecture-exact random presets built in seconds instead of minutes (benchmarks only).

`vrft.models.presets.random_preset` draws every weight with `normal_` on the CPU: about 45 s for 7B before
anything reaches the GPU. Memory and speed do not depend on the values, so the benchmark builds the
parameters on the meta device and then materialises them: with CUDA, directly on the GPU in the load dtype
(`normal_` there takes milliseconds; the precision plugin then quantises them in place when Lightning moves
the model, so setup briefly holds the bf16 weights on the GPU, before any phase is measured); without CUDA
by tiling one block of N(0, 0.02) draws. Norm weights are 1 and biases 0, as after the real init; buffers
(rotary frequencies) are built normally.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vrft.models.presets import model_class, preset_config

BLOCK = 1 << 22  # 4M draws: tiles repeat every 8 MB of bf16, far apart from one matrix row to the next


@contextmanager
def parameters_on_meta():
    """Register every new parameter on the meta device (buffers stay real), like accelerate's init_empty_weights."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _fill(tensor: torch.Tensor, block: torch.Tensor, offset: int) -> None:
    flat = tensor.view(-1)
    start = 0
    while start < flat.numel():
        count = min(flat.numel() - start, block.numel() - offset)
        flat[start : start + count].copy_(block[offset : offset + count])
        start, offset = start + count, 0


def fast_random_preset(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """`random_preset`'s model, filled fast: same architecture, dtype and parameter statistics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = preset_config(name)
    with parameters_on_meta():
        model = model_class(config)._from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    # Explicit devices: Lightning calls configure_model under a CUDA default-device context.
    block = (
        None
        if device.type == "cuda"
        else (torch.randn(BLOCK, generator=generator, device="cpu") * 0.02).to(dtype)
    )
    materialised: dict[int, nn.Parameter] = {}  # tied weights (2B's embedding and lm_head) stay tied
    for module in model.modules():
        for param_name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in materialised:
                data = torch.empty(param.shape, dtype=dtype, device=device)
                if param.ndim == 1:
                    data.fill_(0.0 if param_name == "bias" else 1.0)
                elif device.type == "cuda":
                    data.normal_(0.0, 0.02)
                else:
                    offset = int(torch.randint(0, BLOCK, (1,), generator=generator, device="cpu"))
                    _fill(data, block, offset)
                materialised[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[param_name] = materialised[id(param)]
    model.tie_weights()  # registering on meta gave tied weights separate objects; tie them again
    return model
