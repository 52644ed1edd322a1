"""The Gemma 4 vision tower (16 layers/768 wide on E2B/E4B, 27/1152 on 26B/31B), as transformers'
`Gemma4VisionModel` computes it, plus the projection into the text space (`embed_vision`).

pixels [N, 3*p*p] in [0, 1] -> patch embedding + learned 2D positions -> bidirectional encoder with 2D
RoPE -> k x k average pooling -> * sqrt(hidden) -> standardize -> [N / k^2, hidden].

transformers pads every image to the budget's patch count and masks the padding out; padded patches
never change a real one, so here an image runs unpadded (its own length, no mask).
Weight names follow transformers under `model.vision_tower.` / `model.embed_vision.`.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from .layers import ClippableLinear, RMSNorm, geglu, rms_norm_no_scale

QUERY_BLOCK = 2048


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: Optional[dict] = None

    def __post_init__(self):
        rope = self.rope_parameters or {"rope_type": "axial", "rope_theta": 100.0}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ConfigError(f"vision rope_type {rope.get('rope_type')!r} is not supported; Gemma 4 uses axial RoPE")
        self.rope_theta = float(rope.get("rope_theta", 100.0))
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(f"vision hidden_activation {self.hidden_activation!r} is not supported")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2D RoPE)")

    @classmethod
    def from_dict(cls, config: dict) -> "VisionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Axial RoPE: the first half of each head rotates with the x position, the second with y.

    x [B, N, heads, d]; cos/sin [B, N, 1, d/2] hold the x angles then the y angles (d/4 each).
    Each half is rotated the non-interleaved way (rotate_half), as transformers does.
    """
    quarter = x.shape[-1] // 4
    parts = []
    for axis in range(2):
        part = x[..., 2 * quarter * axis : 2 * quarter * (axis + 1)]
        c = cos[..., quarter * axis : quarter * (axis + 1)]
        s = sin[..., quarter * axis : quarter * (axis + 1)]
        c, s = mx.concatenate([c, c], axis=-1), mx.concatenate([s, s], axis=-1)
        first, second = part[..., :quarter], part[..., quarter:]
        parts.append(part * c + mx.concatenate([-second, first], axis=-1) * s)
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, dim, clipped = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.head_dim, self.eps = dim, config.rms_norm_eps
        self.q_proj = ClippableLinear(clipped, hidden, config.num_attention_heads * dim)
        self.k_proj = ClippableLinear(clipped, hidden, config.num_key_value_heads * dim)
        self.v_proj = ClippableLinear(clipped, hidden, config.num_key_value_heads * dim)
        self.o_proj = ClippableLinear(clipped, config.num_attention_heads * dim, hidden)
        self.q_norm = RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        queries = rope_2d(self.q_norm(self.q_proj(x).reshape(shape)), cos, sin)
        keys = rope_2d(self.k_norm(self.k_proj(x).reshape(shape)), cos, sin)
        values = rms_norm_no_scale(self.v_proj(x).reshape(shape), self.eps)
        queries, keys, values = (a.transpose(0, 2, 1, 3) for a in (queries, keys, values))
        # MLX has no fused attention for head_dim 72 (26B/31B): bound the scores it materialises
        # (10080 patches at budget 1120) by taking the queries in blocks.
        out = mx.concatenate([
            mx.fast.scaled_dot_product_attention(queries[:, :, start : start + QUERY_BLOCK], keys, values, scale=1.0)
            for start in range(0, length, QUERY_BLOCK)
        ], axis=2)  # fmt: skip
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, inner, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(clipped, hidden, inner)
        self.up_proj = ClippableLinear(clipped, hidden, inner)
        self.down_proj = ClippableLinear(clipped, inner, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def __call__(self, x, cos, sin):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        # Gemma 4 feeds pixels in [-1, 1]; the processor leaves them in [0, 1].
        h = self.input_proj((2 * (pixels - 0.5)).astype(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return h + table[0][positions[..., 0]] + table[1][positions[..., 1]]


class VisionTower(nn.Module):
    """`tower(pixels [B, N, 3*p*p], positions [B, N, 2] (x, y), grid (rows, cols)) -> [B, N/k^2, hidden]`.

    All B images share one patch grid (one image, or the frames of one video), row-major.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))
        quarter = config.head_dim // 4
        self._inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter)))

    def __call__(self, pixels: mx.array, positions: mx.array, grid: tuple[int, int]) -> mx.array:
        config = self.config
        rows, cols = grid
        k = config.pooling_kernel_size
        if rows * cols != pixels.shape[1] or rows % k or cols % k:
            raise ValueError(f"a {rows}x{cols} patch grid does not hold {pixels.shape[1]} patches in {k}x{k} pools")
        h = self.patch_embedder(pixels, positions)
        angles = positions[..., None].astype(mx.float32) * self._inv_freq  # [B, N, 2, d/4]
        angles = angles.reshape(*angles.shape[:2], 1, -1)  # x angles, then y angles
        cos, sin = mx.cos(angles).astype(h.dtype), mx.sin(angles).astype(h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        batch, dim = h.shape[0], h.shape[-1]
        pooled = h.astype(mx.float32).reshape(batch, rows // k, k, cols // k, k, dim).mean(axis=(2, 4))
        pooled = pooled.reshape(batch, -1, dim) * math.sqrt(config.hidden_size)
        if config.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> text space: RMSNorm without scale, then a linear (transformers' Gemma4MultimodalEmbedder)."""

    def __init__(self, in_features: int, text_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_features, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm_no_scale(x, self.eps))
