"""mlx.nn's quantized linear layers with their matmul on the kernels' dispatch table.

The same parameters under the same names as nn.QuantizedLinear / nn.QuantizedEmbedding (checkpoints
load unchanged); only the affine matmul goes through `kernels.quantized_matmul`, which picks our GEMV
for decode, dequantize-then-matmul for prefill or MLX's op, per backend. Other modes keep MLX's op.
"""

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..kernels.quantized_matmul import PATH_ENV, quantized_matmul


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


def kernel_layers_wanted() -> bool:
    """Whether loaders swap our layers in: only when MLX_GEMMA4_QUANTIZED_MATMUL names a path other than
    MLX's. Measured end to end on an H100 (benchmarks/results/e2e-h100-4bit.md) our layers prefilled 31B
    1.40x faster than mlx-lm but decoded at 0.73-0.75x on E2B and 31B, where MLX's own layers had been at
    parity: each call's dispatch costs ~6 us of Python on top of MLX's op (2-core dev box; a decode
    step makes ~350-420 such calls), and the prefill's dequantized weights raised 31B's peak memory from 23 to 34 GB. Until
    that is fixed MLX's layers are the default."""
    return os.environ.get(PATH_ENV, "mlx") != "mlx"


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
