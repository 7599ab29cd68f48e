"""Attention kernels that return token-summed maps alongside the output (used by LAG)."""

from persres.kernels.attention import Backend, attention, available_backends, resolve_backend
from persres.kernels.processor import KernelAttnProcessor, attention_backend, attention_processors, block_of

__all__ = [
    "Backend",
    "KernelAttnProcessor",
    "attention",
    "attention_backend",
    "attention_processors",
    "available_backends",
    "block_of",
    "resolve_backend",
]
