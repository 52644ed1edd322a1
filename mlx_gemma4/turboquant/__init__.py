"""TurboQuant KV-cache quantization: Lloyd-Max codebooks, randomized Hadamard rotation, packed codes."""

from .codec import TurboQuantCodec

__all__ = ["TurboQuantCodec"]
