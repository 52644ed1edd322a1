"""Small building blocks shared by the Gemma 4 decoder: norms, RoPE, the GeGLU MLP, masks."""

import math
from functools import partial
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import LayerSpec
from ..kernels import head_norm_rope
from .fused import Projections


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: the weight multiplies directly (no Gemma 2/3 `1 + w` offset)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self["weight"], self.eps)  # by item: see text.Attention


def rms_norm_no_scale(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


class RoPE(nn.Module):
    """Default RoPE (all dims rotate) or Gemma 4's proportional partial RoPE.

    Proportional RoPE rotates the first `fraction * head_dim / 2` frequency pairs with exponents
    normalised by the full head_dim; the remaining pairs have frequency 0 (an infinite period here),
    i.e. they pass through unrotated.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.dims = spec.head_dim
        self.base = spec.rope_theta
        rotated_pairs = int(spec.rope_fraction * spec.head_dim // 2)
        if rotated_pairs < spec.head_dim // 2:
            exponents = mx.arange(0, 2 * rotated_pairs, 2, dtype=mx.float32) / spec.head_dim
            periods = self.base**exponents
            unrotated = mx.full((spec.head_dim // 2 - rotated_pairs,), mx.inf)
            self._periods = mx.concatenate([periods, unrotated])
        else:
            self._periods = None
        # The same rotation's inverse frequencies as kernels/head_norm_rope.py takes them (held as a plain
        # attribute: not a parameter, never cast by set_dtype).
        self.__dict__["frequencies"] = head_norm_rope.rope_frequencies(self.base, self._periods)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        periods = self.get("_periods")  # by item (see text.Attention); None is a plain attribute, not an item
        if periods is None:
            return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_approx(gate) * up. Two kernels on the GPU: shapeless compile puts a broadcast before every
    operand and MLX fuses at most 11 nodes deep. A rebalanced spelling fuses into one, but its bf16
    rounding drifts from transformers' (the bundled model's greedy text then parts from it sooner)."""
    return nn.gelu_approx(gate) * up


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.project_gate_up = Projections("project_gate_up", ("gate_proj", "up_proj"))  # fused.py may fuse them

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.project_gate_up(self, x)
        return self["down_proj"](geglu(gate, up))  # by item: see text.Attention


@partial(mx.compile, shapeless=True)
def soft_cap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


Mask = Union[None, str, mx.array]


def attention_mask(
    query_start: int,
    query_len: int,
    key_positions: np.ndarray,
    window: Optional[int],
    left_padding: Optional[np.ndarray],
    blocks: Optional[np.ndarray] = None,
) -> mx.array:
    """Boolean mask [B or 1, 1, query_len, keys]: causal, inside the window, not padding, not empty.

    Built on the host from cache bookkeeping. A padding query still sees itself, so its (discarded)
    row never becomes all -inf. `blocks` [query_len] numbers the queries' image spans (-1: text);
    a query also sees the later keys of its own span (spans lie whole inside the queries).
    """
    q = np.arange(query_start, query_start + query_len)[:, None]
    k = key_positions[None, :]
    mask = (k <= q) & (k >= 0)
    if blocks is not None:
        inside = (k >= query_start) & (k < query_start + query_len)
        key_blocks = np.where(inside, blocks[np.clip(k - query_start, 0, query_len - 1)], -1)
        mask |= (key_blocks == blocks[:, None]) & (blocks[:, None] >= 0)
    if window is not None:
        mask &= k > q - window
    if left_padding is None:
        return mx.array(mask[None, None])
    pad = left_padding[:, None, None, None]
    return mx.array(mask[None, None] & ((k >= pad) | (k == q)))


class ClippableLinear(nn.Module):
    """The towers' bias-free linear (transformers' Gemma4ClippableLinear): when `clipped`, its input and
    output are clamped to bounds stored in the checkpoint, cast to the activations' dtype as there."""

    def __init__(self, clipped: bool, in_dims: int, out_dims: int):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))
