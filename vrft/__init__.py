"""vrft: Visual-RFT (GRPO with verifiable rewards) for Qwen2-VL on one 24 GB GPU."""

__version__ = "0.1.0"
