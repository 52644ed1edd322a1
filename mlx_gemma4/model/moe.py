"""The 26B-A4B mixture-of-experts block: router and gathered expert GeGLU.

HF stores the experts' gate and up projections fused (`experts.gate_up_proj`, [E, 2*I, H]); we keep
them fused so each token's experts cost one gathered matmul for gate+up and one for down.
"""

import mlx.core as mx
import mlx.nn as nn

from .layers import geglu, rms_norm_no_scale

# Below this many (token, expert) pairs, sorting tokens by expert costs more than it saves.
SORT_THRESHOLD = 64


class Router(nn.Module):
    """rms-norm (no weight) * scale * hidden^-0.5 -> proj -> top-k -> softmax -> * per_expert_scale."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = mx.ones((hidden_size,))
        self.per_expert_scale = mx.ones((num_experts,))
        self.top_k = top_k
        self.eps = eps
        self.root_size = hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = rms_norm_no_scale(x, self.eps) * (self.scale * self.root_size)
        logits = self.proj(x)
        indices = mx.stop_gradient(mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        # Softmax over the chosen logits equals transformers' full softmax renormalised over the top-k.
        weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1).astype(mx.float32), axis=-1)
        weights = weights * self.per_expert_scale[indices].astype(mx.float32)
        return indices, weights


class SwitchLinear(nn.Module):
    """A stack of per-expert linear layers applied to gathered rows: weight [E, out, in]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

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

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class Experts(nn.Module):
    def __init__(self, hidden_size: int, expert_size: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(hidden_size, 2 * expert_size, num_experts)
        self.down_proj = SwitchLinear(expert_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [..., H], indices/weights [..., K] -> weighted sum of the K experts' outputs [..., H]."""
        lead, k = x.shape[:-1], indices.shape[-1]
        x = x.reshape(-1, 1, 1, x.shape[-1])
        flat = indices.reshape(-1, k)
        do_sort = flat.size >= SORT_THRESHOLD
        if do_sort:
            order = mx.argsort(flat.flatten())
            inverse = mx.argsort(order)
            x = x[order // k]
            flat = flat.flatten()[order][:, None]
        gate, up = mx.split(self.gate_up_proj(x, flat, do_sort), 2, axis=-1)
        out = self.down_proj(geglu(gate, up), flat, do_sort)
        if do_sort:
            out = out[inverse]
        out = out.reshape(*lead, k, out.shape[-1])
        return (out * weights[..., None].astype(out.dtype)).sum(axis=-2)
