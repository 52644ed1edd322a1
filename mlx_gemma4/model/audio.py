"""The Gemma 4 audio tower (E2B, E4B), written to match transformers' `Gemma4AudioModel`.

A USM-style conformer: two stride-2 convolutions turn 10 ms mel frames into 40 ms steps, then
conformer blocks (half-step feed-forward, chunked local self-attention with relative positions and a
logit cap, a causal depthwise convolution, another half-step feed-forward), then a projection.
`AudioEmbedder` is transformers' `embed_audio`: it maps the tower's output into the text model.

Parameter names are transformers' after `model.audio_tower.` and `model.embed_audio.`; the two
convolution weights are stored channels-first by transformers and channels-last by MLX
(`AudioEncoder.sanitize` turns them).
"""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from .layers import ClippableLinear, RMSNorm, rms_norm_no_scale

AUDIO_MODEL_TYPE = "gemma4_audio"
SUBSAMPLING_KERNEL = 3  # the subsampling convolutions: 3x3, stride 2, padding 1 (not in the config)
NORM_EPS = 1e-6  # transformers builds the conformer block's and feed-forward's norms with the default eps


@dataclass
class AudioConfig:
    """transformers' `Gemma4AudioConfig`, same fields and defaults."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config: dict) -> "AudioConfig":
        """Read an `audio_config` dict (config.json's, keys transformers does not know are ignored)."""
        model_type = config.get("model_type", AUDIO_MODEL_TYPE)
        if model_type != AUDIO_MODEL_TYPE:
            raise ConfigError(f"audio_config has model_type {model_type!r}; expected {AUDIO_MODEL_TYPE!r}")
        names = {f.name for f in fields(cls)}
        audio = cls(**{k: v for k, v in config.items() if k in names})
        audio.subsampling_conv_channels = tuple(audio.subsampling_conv_channels)
        audio.validate()
        return audio

    def validate(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"audio hidden_act {self.hidden_act!r} is not supported; Gemma 4 uses 'silu'")
        if self.hidden_size % self.num_attention_heads or self.hidden_size % 2:
            raise ConfigError(
                f"audio hidden_size {self.hidden_size} must be even and divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        channels = self.subsampling_conv_channels
        if len(channels) != 2 or channels[0] < 4 or channels[1] < 1:
            raise ConfigError(f"subsampling_conv_channels {list(channels)} must be two sizes, the first >= 4")
        if self.attention_chunk_size < 1 or self.attention_context_left < 1 or self.attention_context_right < 0:
            raise ConfigError("audio attention_chunk_size and attention_context_left must be >= 1, context_right >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_past(self) -> int:
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """Keys each chunk of queries sees: the chunk, its left context, its right context."""
        return self.attention_chunk_size + self.max_past + self.attention_context_right

    @property
    def n_mels(self) -> int:
        """Mel bins the input projection implies (transformers sizes it as channels[0] // 4 * channels[1])."""
        return self.subsampling_conv_channels[0]


ACTIVATIONS = {"silu": nn.silu}


def clip_bound(x: mx.array, bound: float) -> mx.array:
    """transformers' gradient clipping in the forward pass, with the bound capped at the dtype's max."""
    bound = min(bound, mx.finfo(x.dtype).max)
    return mx.clip(x, -bound, bound)


class SubsampleLayer(nn.Module):
    """Masked input -> 3x3 stride-2 conv -> LayerNorm over channels -> ReLU, on [B, T, F, C]."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        k = SUBSAMPLING_KERNEL
        self.conv = nn.Conv2d(in_channels, out_channels, k, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = x * mask[:, :, None, None].astype(x.dtype)
        x = nn.relu(self.norm(self.conv(x)))
        return x, mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        batch, steps, freq, channels = x.shape
        return self.input_proj_linear(x.reshape(batch, steps, freq * channels)), mask


class FeedForward(nn.Module):
    """Half-step (macaron) feed-forward: its output is scaled by `residual_weight` before the residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.ffw_layer_1 = ClippableLinear(config.use_clipped_linears, hidden, hidden * 4)
        self.ffw_layer_2 = ClippableLinear(config.use_clipped_linears, hidden * 4, hidden)
        self.pre_layer_norm = RMSNorm(hidden, NORM_EPS)
        self.post_layer_norm = RMSNorm(hidden, NORM_EPS)
        self.act = ACTIVATIONS[config.hidden_act]
        self.clip = config.gradient_clipping
        self.residual_weight = config.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(clip_bound(x, self.clip))
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(clip_bound(h, self.clip)) * self.residual_weight


def relative_positions(config: AudioConfig) -> mx.array:
    """Sinusoidal embeddings [P, hidden] of the distances context_size // 2 down to 0 ([sin..., cos...])."""
    half = config.hidden_size // 2
    increment = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = mx.exp(mx.arange(half, dtype=mx.float32) * -increment)
    positions = mx.arange(config.context_size // 2, -1, -1, dtype=mx.float32)
    scaled = positions[:, None] * inv_timescales[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


def chunk_blocks(x: mx.array, config: AudioConfig) -> mx.array:
    """[B, T, ...] -> [B, num_blocks, chunk, ...], zero-padded at the end."""
    chunk = config.attention_chunk_size
    blocks = -(-x.shape[1] // chunk)
    x = mx.pad(x, [(0, 0), (0, blocks * chunk - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], blocks, chunk, *x.shape[2:])


def chunk_contexts(x: mx.array, config: AudioConfig) -> mx.array:
    """[B, T, ...] -> [B, num_blocks, context_size, ...]: each chunk's keys, zero-padded at both ends."""
    chunk, context = config.attention_chunk_size, config.context_size
    after = config.attention_context_right + chunk - 1
    x = mx.pad(x, [(0, 0), (config.max_past, after)] + [(0, 0)] * (x.ndim - 2))
    blocks = (x.shape[1] - context) // chunk + 1
    starts = mx.arange(blocks)[:, None] * chunk
    return x[:, starts + mx.arange(context)[None, :]]


class AudioAttention(nn.Module):
    """Chunked local attention: queries in chunks of `attention_chunk_size`, each chunk attends to a
    window of `context_size` keys around it; Transformer-XL relative position logits; tanh logit cap."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.heads, self.head_dim = heads, config.head_dim
        self.q_scale = (self.head_dim**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = ClippableLinear(config.use_clipped_linears, hidden, hidden)
        self.k_proj = ClippableLinear(config.use_clipped_linears, hidden, hidden)
        self.v_proj = ClippableLinear(config.use_clipped_linears, hidden, hidden)
        self.post = ClippableLinear(config.use_clipped_linears, hidden, hidden)
        self.relative_k_proj = nn.Linear(hidden, hidden, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def _relative_shift(self, x: mx.array) -> mx.array:
        """[B, H, U, W, P] logits per distance -> [B, H, U, W, context] per key slot (Transformer-XL, app. B)."""
        batch, heads, blocks, chunk, positions = x.shape
        context = self.config.context_size
        x = mx.pad(x, [(0, 0)] * 4 + [(0, context + 1 - positions)])
        x = x.reshape(batch, heads, blocks, chunk * (context + 1))[..., : chunk * context]
        return x.reshape(batch, heads, blocks, chunk, context)

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        """x [B, T, hidden]; positions [P, hidden]; mask [B, 1, U, W, context] (True: may attend)."""
        batch, length, _ = x.shape
        shape = (batch, length, self.heads, self.head_dim)
        q = self.q_proj(x).astype(mx.float32).reshape(shape)
        k = self.k_proj(x).astype(mx.float32).reshape(shape)
        v = self.v_proj(x).astype(mx.float32).reshape(shape)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32))
        k = k * self.k_scale

        q = chunk_blocks(q, self.config).transpose(0, 3, 1, 2, 4)  # [B, H, U, W, D]
        k = chunk_contexts(k, self.config).transpose(0, 3, 1, 4, 2)  # [B, H, U, D, C]
        v = chunk_contexts(v, self.config).transpose(0, 3, 1, 2, 4)  # [B, H, U, C, D]
        _, heads, blocks, chunk, dim = q.shape

        rel_k = self.relative_k_proj(positions.astype(self.relative_k_proj.weight.dtype))
        rel_k = rel_k.astype(mx.float32).reshape(-1, heads, dim).transpose(1, 2, 0)  # [H, D, P]
        by_distance = (q.reshape(batch, heads, blocks * chunk, dim) @ rel_k).reshape(batch, heads, blocks, chunk, -1)
        logits = q @ k + self._relative_shift(by_distance)

        cap = self.config.attention_logit_cap
        logits = mx.tanh(logits / cap) * cap
        logits = mx.where(mask, logits, self.config.attention_invalid_logits_value)
        out = mx.softmax(logits, axis=-1, precise=True) @ v  # [B, H, U, W, D]
        out = out.transpose(0, 2, 3, 1, 4).reshape(batch, blocks * chunk, -1)[:, :length]
        return self.post(out.astype(x.dtype))


class DepthwiseCausalConv1d(nn.Module):
    """Per-channel causal convolution over time, [B, T, C] -> [B, T, C], as a sum of K shifted products
    (plain ops on every backend; no grouped convolution needed). Weight [C, K, 1] as `nn.Conv1d`'s."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, 1))

    def __call__(self, x: mx.array) -> mx.array:
        kernel, length = self.weight.shape[1], x.shape[1]
        x = mx.pad(x, [(0, 0), (kernel - 1, 0), (0, 0)])
        taps = self.weight[:, :, 0].astype(x.dtype)
        out = x[:, :length] * taps[:, 0]
        for k in range(1, kernel):
            out = out + x[:, k : k + length] * taps[:, k]
        return out


class LightConv1d(nn.Module):
    """GLU, causal depthwise convolution over time, norm, activation, projection; residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.linear_start = ClippableLinear(config.use_clipped_linears, hidden, hidden * 2)
        self.linear_end = ClippableLinear(config.use_clipped_linears, hidden, hidden)
        self.depthwise_conv1d = DepthwiseCausalConv1d(hidden, config.conv_kernel_size)
        self.pre_layer_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.conv_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.clip = config.gradient_clipping

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        a, b = mx.split(h, 2, axis=-1)
        h = self.conv_norm(clip_bound(self.depthwise_conv1d(a * mx.sigmoid(b)), self.clip))
        return x + self.linear_end(self.act(h))


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = AudioAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = RMSNorm(hidden, NORM_EPS)
        self.norm_post_attn = RMSNorm(hidden, NORM_EPS)
        self.norm_out = RMSNorm(hidden, NORM_EPS)
        self.clip = config.gradient_clipping

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        attn = self.self_attn(self.norm_pre_attn(clip_bound(x, self.clip)), positions, mask)
        x = x + self.norm_post_attn(clip_bound(attn, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(clip_bound(x, self.clip))


class AudioEncoder(nn.Module):
    """`encoder(features [B, T, n_mels], mask [B, T] bool) -> (hidden [B, T', output_proj_dims], mask [B, T'])`
    with T' = ceil(ceil(T / 2) / 2); `mask` is True on real audio frames, the output mask on real steps."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)
        self._positions = relative_positions(config)

    def attention_mask(self, valid: mx.array) -> mx.array:
        """[B, 1, U, W, context] bool: the key is a real step inside the query's local window.

        The window depends only on the query's row in its chunk and the key's slot in the context."""
        c = self.config
        row = mx.arange(c.attention_chunk_size)[:, None]
        slot = mx.arange(c.context_size)[None, :]
        distance = row + c.max_past - slot  # query position minus key position
        past = (distance >= 0) & (distance < c.max_past)
        window = past | ((distance < 0) & (-distance < c.attention_context_right))
        return chunk_contexts(valid, c)[:, None, :, None, :] & window

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(
                f"audio features must be [batch, frames, mels] with a [batch, frames] mask; "
                f"got {tuple(features.shape)} and {tuple(mask.shape)}"
            )
        if -(-features.shape[-1] // 4) != self.config.n_mels // 4:  # frequency bins after two stride-2 convs
            raise ValueError(
                f"audio features have {features.shape[-1]} mel bins; this audio tower expects {self.config.n_mels}"
            )
        dtype = self.subsample_conv_projection.layer0.conv.weight.dtype  # convolutions are never quantized
        mask = mask.astype(mx.bool_)
        x, mask = self.subsample_conv_projection(features.astype(dtype), mask)
        attention_mask = self.attention_mask(mask)
        for layer in self.layers:
            x = layer(x, self._positions, attention_mask)
        return self.output_proj(x), mask

    def sanitize(self, weights: dict) -> dict:
        """Turn transformers' channels-first convolution weights (names after `model.audio_tower.`)
        channels-last; weights already in MLX layout pass through."""
        expected = dict(nn.utils.tree_flatten(self.parameters()))
        out = {}
        for name, value in weights.items():
            shape = tuple(expected[name].shape) if name in expected else None
            if name.endswith("conv.weight") or name.endswith("depthwise_conv1d.weight"):
                # torch [out, in, (kh,) kw] -> MLX [out, (kh,) kw, in]
                moved = mx.moveaxis(value, 1, -1)
                if tuple(value.shape) != shape and tuple(moved.shape) == shape:
                    value = moved
            out[name] = value
        return out


class AudioEmbedder(nn.Module):
    """transformers' `embed_audio`: a scale-free RMSNorm, then a projection to the text hidden size."""

    def __init__(self, config: AudioConfig, text_hidden_size: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.embedding_projection = nn.Linear(config.output_proj_dims, text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm_no_scale(x, self.eps))
