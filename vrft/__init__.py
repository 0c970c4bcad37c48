"""vrft: Visual-RFT (GRPO with verifiable rewards) for Qwen2-VL on one 24 GB GPU."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns on every CPU import that an optional faster 4-bit kernel package is missing; the
# fallback it uses is correct, so the warning only buries vrft's own output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
