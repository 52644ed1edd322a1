"""The Gemma 4 text decoder (E2B, E4B, 26B-A4B, 31B), written to match transformers' Gemma4ForCausalLM.

Weight names follow transformers (`model.layers.N.self_attn.q_proj.weight`, ...), except that the
experts' fused `gate_up_proj` / `down_proj` tensors are held by modules (`...gate_up_proj.weight`)
so that they can be quantized like any linear layer.
"""

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import FullCache, SlidingCache
from ..quantized_cache import KVQuantConfig, Packed, make_quantized_cache, quantized_attention
from ..kernels import head_norm_rope, scaled_dot_product_attention
from ..kernels.residual_norm import add_norm, add_scaled
from ..config import FULL, SLIDING, LayerSpec, TextConfig
from .fused import Projections
from .layers import MLP, RMSNorm, RoPE, attention_mask, geglu, rms_norm_no_scale, soft_cap
from .moe import Experts, Router


class Attention(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        n_heads, dim = config.num_attention_heads, spec.head_dim
        bias = config.attention_bias
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(config.hidden_size, n_heads * dim, bias=bias)
        self.q_norm = RMSNorm(dim, self.eps)
        if spec.owns_kv:
            self.k_proj = nn.Linear(config.hidden_size, spec.num_kv_heads * dim, bias=bias)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(config.hidden_size, spec.num_kv_heads * dim, bias=bias)
            self.k_norm = RMSNorm(dim, self.eps)
            # q/k(/v) of one input: fused.py may make them one matmul once the weights are loaded.
            self.project_qkv = Projections("project_qkv", ("q_proj", "k_proj") + (() if spec.k_eq_v else ("v_proj",)))
        self.o_proj = nn.Linear(n_heads * dim, config.hidden_size, bias=bias)
        self.rope = RoPE(spec)

    def __call__(self, x, mask, offset: int, cache=None, shared_kv=None):
        # Members by item (self["q_proj"]), here and in the decoder layer: nn.Module's attribute lookup
        # of a member first raises and catches an AttributeError, ~1 us a time, ~30 times a layer, and a
        # decode step on a GPU is bound by host time.
        batch, length, _ = x.shape
        dim = self.spec.head_dim
        rope = self["rope"]
        prepared = False
        if shared_kv is not None:
            queries = self["q_proj"](x)
            keys, values = shared_kv
        else:
            queries, keys, *values = self.project_qkv(self, x)
            # k_eq_v (global layers of 26B/31B): values are the raw key projection, before k_norm.
            values = values[0] if values else keys
            wq, wk = self["q_norm"]["weight"], self["k_norm"]["weight"]
            heads = head_norm_rope.plan(queries, keys, values, wq, wk, rope.frequencies, self.eps, dim)
            if heads is not None:  # the norms and RoPEs of all three in one launch (decode rows on a GPU)
                queries, keys, values = heads(queries, keys, values, wq, wk, rope.frequencies[1], offset)
                prepared = True
            else:
                keys = rope(self["k_norm"](keys.reshape(batch, length, -1, dim)).transpose(0, 2, 1, 3), offset)
                values = rms_norm_no_scale(values.reshape(batch, length, -1, dim), self.eps).transpose(0, 2, 1, 3)
            keys, values = cache.update_and_fetch(keys, values)
        if not prepared:
            queries = self["q_norm"](queries.reshape(batch, length, -1, dim))
            queries = rope(queries.transpose(0, 2, 1, 3), offset)
        attend = quantized_attention if isinstance(keys, Packed) else scaled_dot_product_attention
        out = attend(queries, keys, values, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self["o_proj"](out), (keys, values)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.eps = eps
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(hidden, spec.intermediate_size)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.layer_scalar = mx.ones((1,))
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(hidden, config.num_experts, config.top_k_experts, eps)
            self.experts = Experts(hidden, config.moe_intermediate_size, config.num_experts)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.ple = config.has_ple
        if self.ple:
            ple_dim = config.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(hidden, ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(ple_dim, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def __call__(self, x, mask, offset, cache=None, shared_kv=None, per_layer_input=None):
        attn, kv = self["self_attn"](self["input_layernorm"](x), mask, offset, cache, shared_kv)
        # Each residual add with the norms around it: one kernel on a GPU's decode step, MLX's ops elsewhere
        # (kernels/residual_norm.py).
        h, ffn_input = add_norm(x, attn, self["post_attention_layernorm"]["weight"],
                                self["pre_feedforward_layernorm"]["weight"], self.eps)
        ffn = self["mlp"](ffn_input)
        if self.moe:
            indices, weights = self["router"](h)
            experts = self["experts"](self["pre_feedforward_layernorm_2"](h), indices, weights)
            ffn = self["post_feedforward_layernorm_1"](ffn) + self["post_feedforward_layernorm_2"](experts)
        last, last_norm = ffn, self["post_feedforward_layernorm"]
        if self.ple:
            h = add_scaled(h, ffn, last_norm["weight"], self.eps)
            gated = geglu(self["per_layer_input_gate"](h), per_layer_input)
            last, last_norm = self["per_layer_projection"](gated), self["post_per_layer_input_norm"]
        return add_scaled(h, last, last_norm["weight"], self.eps, self["layer_scalar"]), kv


class TextModel(nn.Module):
    """Embeddings, decoder layers and final norm (transformers' `Gemma4TextModel`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, spec) for spec in config.layers]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.paced_from = math.inf  # from this many rows (batch x length) run one layer ahead at most: _one_layer_ahead
        if config.has_ple:
            n, d = config.num_hidden_layers, config.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, n * d)
            self.per_layer_model_projection = nn.Linear(config.hidden_size, n * d, bias=False)
            self.per_layer_projection_norm = RMSNorm(d, config.rms_norm_eps)

    def per_layer_inputs(self, inputs: mx.array, embeddings: mx.array) -> mx.array:
        """PLE: token-identity rows plus a projection of the embeddings, [B, L, layers, ple_dim]."""
        config = self.config
        shape = (*inputs.shape, config.num_hidden_layers, config.hidden_size_per_layer_input)
        rows = self.embed_tokens_per_layer(inputs)
        rows = rows * mx.array(math.sqrt(config.hidden_size_per_layer_input), rows.dtype)
        projected = self.per_layer_model_projection(embeddings) * (config.hidden_size**-0.5)
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + rows.reshape(shape).astype(projected.dtype)) * (2.0**-0.5)

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        return h * mx.array(math.sqrt(self.config.hidden_size), h.dtype)

    def __call__(
        self,
        inputs: mx.array,
        cache: list,
        logits_to_keep: int = 0,
        embeddings: Optional[mx.array] = None,
        vision_blocks: Optional[np.ndarray] = None,
    ) -> mx.array:
        """`embeddings` replace the token embeddings (multimodal prompts: soft tokens at the placeholders,
        whose `inputs` ids are then the pad id, as the per-layer embeddings look them up);
        `vision_blocks` [L] numbers each image's tokens (-1 for others): they attend to each other
        both ways on sliding layers."""
        config = self.config
        h = self.embed(inputs) if embeddings is None else embeddings
        per_layer = self.per_layer_inputs(inputs, h) if config.has_ple else None
        length = inputs.shape[1]
        offset = cache[0].offset
        masks = self._masks(cache, length, vision_blocks)
        kv = {}
        ahead = None
        for spec, layer in zip(config.layers, self.layers):
            if spec.index == config.first_kv_shared_layer and 0 < logits_to_keep < h.shape[1]:
                # KV-shared layers write no cache, so only the positions whose logits are wanted matter.
                drop = h.shape[1] - logits_to_keep
                h, offset = h[:, drop:], offset + drop
                per_layer = per_layer[:, drop:] if per_layer is not None else None
                masks = {t: m[..., drop:, :] if isinstance(m, mx.array) else m for t, m in masks.items()}
            h, kv[spec.index] = layer(
                h,
                masks[spec.layer_type],
                offset,
                cache=cache[spec.index] if spec.owns_kv else None,
                shared_kv=kv[spec.kv_source] if not spec.owns_kv else None,
                per_layer_input=per_layer[:, :, spec.index] if per_layer is not None else None,
            )
            if h.shape[0] * h.shape[1] >= self.paced_from:  # rows, as the matmul dispatch counts them
                ahead = _one_layer_ahead(h, ahead)
        return self.norm(h)

    def _masks(self, cache: list, length: int, vision_blocks: Optional[np.ndarray] = None) -> dict:
        masks = {}
        for spec in self.config.layers:
            if spec.layer_type in masks or not spec.owns_kv:
                continue
            layer_cache = cache[spec.index]
            window = self.config.sliding_window if spec.is_sliding else None
            # Bidirectional image spans on sliding layers only, as transformers does for Gemma 4.
            blocks = vision_blocks if spec.is_sliding else None
            if blocks is None and layer_cache.left_padding is None and layer_cache.covers_window(length, window):
                masks[spec.layer_type] = "causal" if length > 1 else None
            else:
                masks[spec.layer_type] = attention_mask(
                    layer_cache.offset,
                    length,
                    layer_cache.key_positions(length),
                    window,
                    layer_cache.left_padding,
                    blocks,
                )
        return masks


def _one_layer_ahead(h: mx.array, previous: Optional[mx.array]) -> mx.array:
    """Queue this layer's output, then wait for the previous layer's: the GPU always has the next layer
    queued and the host gets no further ahead. Prefill on dequantized weights needs it: MLX frees an op's
    temporaries (a 31B layer's dequantized weights, ~1 GB) only once the GPU has run it, and lets the
    host queue up to 10 command buffers of up to 100 ops or 1 GB each on an H100, so 31B pp512 with our
    layers peaked 13.5 GB above mlx-lm's (benchmarks/results/2026-11-23-h100-4bit-31b-our-qmm-layers.md)."""
    mx.async_eval(h)
    if previous is not None:
        mx.eval(previous)
    return h


class Model(nn.Module):
    """Gemma 4 causal LM: `model(input_ids [B, L] int32, cache=None) -> logits [B, L, vocab]`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, logits_to_keep: int = 0, **multimodal) -> mx.array:
        """`logits_to_keep` > 0 computes the head only for that many last positions (prefill).

        `multimodal`: `embeddings`, `vision_blocks` of a multimodal prompt chunk (see TextModel)."""
        if cache is None:
            cache = self.make_cache()
        h = self.model(inputs, cache, logits_to_keep, **multimodal)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return soft_cap(logits, mx.array(cap, logits.dtype)) if cap else logits

    def make_cache(
        self, left_padding: Optional[list] = None, rollback: Optional[int] = None,
        kv_quant: Optional[KVQuantConfig] = None,
    ) -> list:
        """One cache per layer that computes keys/values (KV-shared layers own none).

        `left_padding[b]` is how many pad tokens start row b of a left-padded batch; `kv_quant`
        quantizes every layer's cache (quantized_cache.py).
        """
        pad = np.array(left_padding) if left_padding is not None else None
        caches = []
        for spec in self.config.layers[: self.config.first_kv_shared_layer]:
            if kv_quant is not None and kv_quant.enabled:
                caches.append(make_quantized_cache(kv_quant, spec, self.config.sliding_window, pad, rollback))
            elif spec.layer_type == FULL:
                caches.append(FullCache(left_padding=pad))
            else:
                extra = {} if rollback is None else {"rollback": rollback}
                caches.append(SlidingCache(self.config.sliding_window, left_padding=pad, **extra))
        return caches

    @property
    def layers(self):
        return self.model.layers


__all__ = ["Model", "TextModel", "SLIDING", "FULL"]
