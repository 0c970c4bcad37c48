"""Hand-written GPU kernels (Triton). Each module here stands alone: it imports nothing else of vrft."""
