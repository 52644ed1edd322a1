"""mlx.nn's quantized linear layers with their matmul on the kernels' dispatch table.

The same parameters under the same names as nn.QuantizedLinear / nn.QuantizedEmbedding (checkpoints
load unchanged); only the affine matmul goes through `kernels.quantized_matmul`, which picks our GEMV
for decode, dequantize-then-matmul for prefill or MLX's op, per backend. Other modes keep MLX's op.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..kernels.quantized_matmul import quantized_matmul


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if self.mode != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head: the largest single matmul of a decode step."""
        if self.mode != "affine":
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


_OURS = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def use_kernel_layers(model: nn.Module) -> nn.Module:
    """Swap every nn.QuantizedLinear / nn.QuantizedEmbedding of `model` for ours, in place, keeping
    its arrays (lazy ones stay lazy); returns `model`."""

    def swap(_, module):
        ours = _OURS.get(type(module))
        if ours is None:
            return module
        twin = ours.__new__(ours)  # no __init__: it would quantize a random weight
        twin.__dict__.update(module.__dict__)  # group size, bits, mode, frozen state, ...
        dict.update(twin, module)  # the arrays: weight, scales, biases (, bias)
        return twin

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model
