"""The 26B-A4B mixture-of-experts block: router and gathered expert GeGLU.

HF stores the experts' gate and up projections fused (`experts.gate_up_proj`, [E, 2*I, H]); we keep
them fused so each token's experts read gate and up rows together. The math is in
kernels/moe_router.py and kernels/moe_experts.py: their GPU kernels on a GPU (decode), their
references elsewhere; prefill takes kernels/moe_prefill.py's path for its token count.
"""

import mlx.core as mx
import mlx.nn as nn

from ..kernels.moe_experts import experts
from ..kernels.moe_router import route
from ..kernels.moe_weights import Packed


def packed(layer: nn.Module) -> Packed:
    """A linear or switch-linear layer's weight as the MoE kernels read it."""
    # Members by item: nn.Module's attribute lookup of a member costs ~1 µs (a caught AttributeError),
    # and a decode step on a GPU is bound by host time.
    if "scales" not in layer:
        return Packed(layer["weight"])
    return Packed(layer["weight"], layer["scales"], layer.get("biases"), layer.bits, layer.group_size, layer.mode)


class Router(nn.Module):
    """rms-norm (no weight) * scale * hidden^-0.5 -> proj -> top-k -> softmax -> * per_expert_scale."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = mx.ones((hidden_size,))
        self.per_expert_scale = mx.ones((num_experts,))
        self.top_k = top_k
        self.eps = eps

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return route(x, packed(self["proj"]), self["scale"], self["per_expert_scale"], self.top_k, self.eps)


class SwitchLinear(nn.Module):
    """A stack of per-expert linear layers, weight [E, out, in], applied by kernels/moe_experts.py."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims, output_dims, num_experts, group_size=64, bits=4, mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(mx.zeros((num_experts, output_dims, input_dims)), group_size, bits, mode=mode)
        self.weight, self.scales, *rest = packed
        if rest:
            self.biases = rest[0]
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str):
        num_experts, output_dims, input_dims = layer.weight.shape
        q = cls(input_dims, output_dims, num_experts, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if rest:
            q.biases = rest[0]
        return q


class Experts(nn.Module):
    def __init__(self, hidden_size: int, expert_size: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(hidden_size, 2 * expert_size, num_experts)
        self.down_proj = SwitchLinear(expert_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [..., H], indices/weights [..., K] -> weighted sum of the K experts' outputs [..., H]."""
        return experts(x, indices, weights, packed(self["gate_up_proj"]), packed(self["down_proj"]))
