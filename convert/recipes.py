"""Quantization recipes: which text-decoder tensor gets which bits, group size and mode.

Rules shared by every recipe:
- 1-D tensors (norms, `layer_scalar`, the router's `scale` and `per_expert_scale`) are never quantized.
- The MoE router's `proj` is 8-bit affine: a small error there picks different experts.
- A matrix whose input dimension is not a multiple of the group size stays unquantized (in --dtype),
  as in mlx-lm (e.g. a PLE `per_layer_projection` whose input, the PLE width, is 16 at group size 64).
- Vision/audio towers and their projectors are not quantized (they are a small share of the weights
  and image/audio quality is sensitive to them; mlx-vlm does the same by default).

Uniform (`-q --q-bits B --q-mode M`): every other matrix at B bits in mode M, the token embedding
(tied to the output head) and the PLE table included, exactly as mlx-lm quantizes them.

Mixed `mixed_L_H` (affine only; L bits for the bulk, H bits where errors hurt most):
- H: the token embedding / output head; the small PLE matrices (`per_layer_model_projection`,
  `per_layer_input_gate`, `per_layer_projection`); every matrix of the first and the last decoder
  layer; q/k/v/o of the global (full-attention) layers; `v_proj` of every layer; the dense
  `down_proj` of the layers llama.cpp's Q4_K_M gives more bits (first and last eighth, every third).
- L: everything else: sliding-layer q/k/o, dense gate/up, the MoE experts, and the PLE table
  (a lookup whose rows enter each layer through a gate and a norm).
"""

import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ..config import TextConfig
from .errors import ConvertError

MODES = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # default (bits, group)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
MIXED = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SMALL_PLE = ("per_layer_model_projection.", "per_layer_input_gate.", "per_layer_projection.")
ATTENTION = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict:
        return asdict(self)

    def fits(self, shape) -> bool:
        return len(shape) >= 2 and shape[-1] % self.group_size == 0


ROUTER_SPECS = (QuantSpec(8, 64), QuantSpec(8, 32))
Rule = Callable[[str, tuple], Optional[QuantSpec]]


def recipe_specs(
    bits: Optional[int], group_size: Optional[int], mode: str, recipe: Optional[str]
) -> tuple[QuantSpec, Optional[QuantSpec]]:
    """(the default spec, the high spec of a mixed recipe or None); refuses what MLX cannot pack."""
    if mode not in MODES:
        raise ConvertError(f"unknown quantization mode {mode!r}; expected one of {list(MODES)}")
    if recipe is not None:
        if recipe not in MIXED:
            raise ConvertError(f"unknown recipe {recipe!r}; expected one of {list(MIXED)}")
        if mode != "affine":
            raise ConvertError(f"recipe {recipe} is affine; it cannot be combined with --q-mode {mode}")
        if bits is not None:
            raise ConvertError(f"recipe {recipe} sets the bits itself; leave --q-bits unset")
        low, high = MIXED[recipe]
        group_size = group_size or MODES["affine"][1]
        return _checked(QuantSpec(low, group_size)), _checked(QuantSpec(high, group_size))
    default_bits, default_group = MODES[mode]
    return _checked(QuantSpec(bits or default_bits, group_size or default_group, mode)), None


def _checked(spec: QuantSpec) -> QuantSpec:
    if spec.mode == "affine":
        if spec.bits not in AFFINE_BITS or spec.group_size not in AFFINE_GROUPS:
            raise ConvertError(
                f"affine quantization takes bits in {AFFINE_BITS} and group sizes in {AFFINE_GROUPS}; "
                f"got {spec.bits} bits, group size {spec.group_size}"
            )
    elif (spec.bits, spec.group_size) != MODES[spec.mode]:
        bits, group = MODES[spec.mode]
        raise ConvertError(
            f"{spec.mode} always packs {bits} bits in groups of {group}; got {spec.bits} bits, "
            f"group size {spec.group_size} (leave --q-bits/--q-group-size unset)"
        )
    return spec


def make_rule(config: TextConfig, default: QuantSpec, high: Optional[QuantSpec] = None) -> Rule:
    """rule(our tensor name, shape) -> the QuantSpec to store it with, or None to keep it unquantized."""
    pick = (lambda name: default) if high is None else mixed_picker(config, default, high)

    def rule(name: str, shape: tuple) -> Optional[QuantSpec]:
        candidates = ROUTER_SPECS if name.endswith("router.proj.weight") else (pick(name),)
        return next((c for c in candidates if c.fits(shape)), None)

    return rule


def mixed_picker(config: TextConfig, low: QuantSpec, high: QuantSpec) -> Callable[[str], QuantSpec]:
    n = config.num_hidden_layers

    def more_bits(layer: int) -> bool:  # llama.cpp's use_more_bits
        return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2

    def pick(name: str) -> QuantSpec:
        match = LAYER.match(name)
        if match is None:  # embeddings, output head, PLE matrices outside the layers
            if "embed_tokens_per_layer." in name:
                return low
            return high
        layer = int(match.group(1))
        part = name[match.end() :]
        if layer in (0, n - 1) or part.startswith(SMALL_PLE):
            return high
        if part.startswith(ATTENTION) and not config.layers[layer].is_sliding:
            return high
        if part.startswith("self_attn.v_proj."):
            return high
        if part.startswith("mlp.down_proj.") and more_bits(layer):
            return high
        return low

    return pick
