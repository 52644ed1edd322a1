"""Gemma 4 text-decoder configuration: every config.json spelling -> one dataclass.

Spellings read:
- `gemma4` (multimodal, text settings nested in `text_config`) and `gemma4_text` (flat);
- global-layer overrides as `global_head_dim` / `num_global_key_value_heads` (checkpoints written by
  transformers < 5.2x) or as `per_layer_config` (transformers >= 5.2x writes only this form);
- `layer_types`, or mlx-lm's `sliding_window_pattern`, or neither (transformers' default 5:1);
- `rope_parameters` per layer type, or nothing (transformers' defaults).
Defaults are transformers' `Gemma4TextConfig` defaults, not mlx-lm's (which differ, e.g. double-wide MLP).
"""

from dataclasses import dataclass, field, fields
from typing import Any, Optional

SLIDING = "sliding_attention"
FULL = "full_attention"

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
KNOWN_ROPE_TYPES = ("default", "proportional")
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
TEXT_MODEL_TYPES = ("gemma4", "gemma4_text")


class ConfigError(ValueError):
    """A config.json that is not a Gemma 4 text config we can run."""


@dataclass(frozen=True)
class LayerSpec:
    """Everything that varies from one decoder layer to the next, resolved once."""

    index: int
    layer_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_fraction: float  # share of head_dim that rotates (proportional RoPE), 1.0 for default RoPE
    kv_source: Optional[int]  # for KV-shared layers: the layer whose keys/values are reused
    k_eq_v: bool  # values are the (normed) raw keys; no v_proj
    intermediate_size: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def owns_kv(self) -> bool:
        return self.kv_source is None


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    per_layer_config: Optional[dict] = None
    layers: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}; expected {SLIDING!r} or {FULL!r}")
        # transformers forces the last layer to be global; so do we, to build the same model.
        self.layer_types[-1] = FULL
        self.rope_parameters = _resolve_rope(self.rope_parameters)
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; Gemma 4 uses gelu_pytorch_tanh")
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' (encoder-style Gemma 4) is not supported")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        self.layers = self._resolve_layers()

    def _global_overrides(self) -> dict[int, dict]:
        """Per-layer head_dim / kv-head overrides, in transformers' `per_layer_config` form."""
        if self.per_layer_config is not None:
            overrides = {}
            for key, value in self.per_layer_config.items():
                unknown = set(value) - set(PER_LAYER_KEYS)
                if unknown:
                    raise ConfigError(f"per_layer_config[{key}] sets {sorted(unknown)}; only {PER_LAYER_KEYS} are known")
                overrides[int(key)] = dict(value)
            return overrides
        # The older spelling: global layers take global_head_dim, and global KV heads only when k_eq_v
        # (transformers ignores num_global_key_value_heads otherwise).
        override = {"head_dim": self.global_head_dim}
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            override["num_key_value_heads"] = self.num_global_key_value_heads
        return {i: override for i, t in enumerate(self.layer_types) if t == FULL}

    def _resolve_layers(self) -> list[LayerSpec]:
        overrides = self._global_overrides()
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        if not 0 < first_shared <= self.num_hidden_layers:
            raise ConfigError(
                f"num_kv_shared_layers={self.num_kv_shared_layers} leaves no layer that computes keys/values"
            )
        # A KV-shared layer reuses the last non-shared layer of its own type.
        last_of_type = {t: i for i, t in enumerate(self.layer_types[:first_shared])}
        specs = []
        for i, layer_type in enumerate(self.layer_types):
            shared = i >= first_shared
            if shared and layer_type not in last_of_type:
                raise ConfigError(f"layer {i} ({layer_type}) shares KV but no earlier layer of that type computes it")
            rope = self.rope_parameters[layer_type]
            over = overrides.get(i, {})
            wide = self.use_double_wide_mlp and shared
            specs.append(
                LayerSpec(
                    index=i,
                    layer_type=layer_type,
                    head_dim=over.get("head_dim", self.head_dim),
                    num_kv_heads=over.get("num_key_value_heads", self.num_key_value_heads),
                    rope_theta=float(rope["rope_theta"]),
                    rope_fraction=float(rope.get("partial_rotary_factor", 1.0))
                    if rope["rope_type"] == "proportional"
                    else 1.0,
                    kv_source=last_of_type[layer_type] if shared else None,
                    k_eq_v=self.attention_k_eq_v and layer_type == FULL,
                    intermediate_size=self.intermediate_size * (2 if wide else 1),
                )
            )
        for spec in specs:
            if self.num_attention_heads % spec.num_kv_heads:
                raise ConfigError(
                    f"layer {spec.index}: {self.num_attention_heads} attention heads are not a multiple of "
                    f"{spec.num_kv_heads} key/value heads"
                )
            source = spec.kv_source
            if source is not None and (specs[source].head_dim, specs[source].num_kv_heads) != (
                spec.head_dim,
                spec.num_kv_heads,
            ):
                raise ConfigError(f"layer {spec.index} shares KV with layer {source} but their head shapes differ")
        return specs

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def has_ple(self) -> bool:
        return bool(self.hidden_size_per_layer_input)

    @classmethod
    def from_dict(cls, config: dict) -> "TextConfig":
        """Read a config.json dict of model_type gemma4 or gemma4_text (mlx-lm/mlx-vlm output too)."""
        model_type = config.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a Gemma 4 model; expected one of {TEXT_MODEL_TYPES}"
            )
        text = dict(config.get("text_config") or {}) if model_type == "gemma4" else dict(config)
        if model_type == "gemma4" and "vocab_size" not in text and "vocab_size" in config:
            text["vocab_size"] = config["vocab_size"]
        if "layer_types" not in text and "sliding_window_pattern" in text:
            pattern = int(text["sliding_window_pattern"])
            n = text.get("num_hidden_layers", cls.num_hidden_layers)
            text["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        names = {f.name for f in fields(cls)} - {"layers"}
        return cls(**{k: v for k, v in text.items() if k in names})


def _resolve_rope(rope_parameters: Optional[dict]) -> dict:
    if rope_parameters is None:
        return {k: dict(v) for k, v in DEFAULT_ROPE.items()}
    resolved = {}
    for layer_type, default in DEFAULT_ROPE.items():
        params = rope_parameters.get(layer_type) or default
        if params.get("rope_type", "default") not in KNOWN_ROPE_TYPES:
            raise ConfigError(
                f"rope_type {params.get('rope_type')!r} for {layer_type} is not supported; "
                f"expected one of {KNOWN_ROPE_TYPES}"
            )
        if params.get("factor", 1.0) != 1.0:
            raise ConfigError(f"RoPE scaling factor {params['factor']} for {layer_type} is not supported")
        resolved[layer_type] = {"rope_type": "default", **params}
    return resolved
