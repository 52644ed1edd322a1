"""GPU kernels for Gemma 4, each one body in portable Metal spelling run under Metal or CUDA (see
prelude.py), with a pure-MLX reference of identical semantics used everywhere else (see kernel.py)."""

from .decode_attention import decode_attention
from .kernel import ENV, KernelFallbackWarning, backend
from .prefill_attention import CausalMask, prefill_attention
from .sdpa import scaled_dot_product_attention

__all__ = [
    "ENV",
    "CausalMask",
    "KernelFallbackWarning",
    "backend",
    "decode_attention",
    "prefill_attention",
    "scaled_dot_product_attention",
]
