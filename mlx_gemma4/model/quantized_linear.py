"""mlx.nn's quantized linear layers with their matmul on the kernels' dispatch table.

The same parameters under the same names as nn.QuantizedLinear / nn.QuantizedEmbedding (checkpoints
load unchanged); only the affine matmul goes through `kernels.quantized_matmul`, which picks our GEMV
for decode, dequantize-then-matmul for prefill or MLX's op, per backend. Other modes keep MLX's op.

A decode step is bound by host time on MLX's CUDA backend, so a call costs one dict lookup on top of
the op: each layer keeps a plan per input signature (shape, dtype), and the path asked for
(MLX_GEMMA4_QUANTIZED_MATMUL) and the backend (MLX_GEMMA4_KERNELS) are read once, when
`use_kernel_layers` swaps the layers in; call it again after changing them.
"""

import os
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..kernels import backend
from ..kernels.quantized_matmul import DISPATCH, PATH_ENV, PATHS, dequantizes_from, geglu_plan, plan
from .layers import MLP


class _Planned:
    """The plans of one quantized layer: `path` and `on` fixed at swap time, one plan per signature."""

    def _setup(self, path: str, on: str):
        # Plain attributes, not module members: nn.Module would take a dict for a child tree.
        self.__dict__.update(path=path, on=on, plans={})

    def _plan(self, x: mx.array):
        if self.mode != "affine":
            group_size, bits, mode = self.group_size, self.bits, self.mode
            found = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, True, group_size, bits, mode)
        else:
            found = plan(self.path, self.on, x, self["weight"], self["scales"], self["biases"], self.group_size,
                         self.bits)
        self.plans[x.shape, x.dtype] = found
        return found

    def _matmul(self, x: mx.array) -> mx.array:
        run = self.plans.get((x.shape, x.dtype)) or self._plan(x)
        return run(x, self["weight"], self["scales"], self.get("biases"))


class QuantizedLinear(_Planned, nn.QuantizedLinear):
    fusable = True  # model/fused.py may concatenate several (a layer's q/k/v): its copy plans afresh

    def __copy__(self):
        return _twin(type(self), self, self.path, self.on)

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(_Planned, nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head: the largest single matmul of a decode step."""
        return self._matmul(x)


class GegluMLP(MLP):
    """An MLP whose gate and up projections are our layers of one format: where the GEMV serves the
    gate's row count, one fused launch computes gelu_tanh(gate) * up (one launch and one op fewer, x
    read once); elsewhere the plain MLP. Plans as the layers', per input signature."""

    def __call__(self, x: mx.array) -> mx.array:
        return (self.plans.get((x.shape, x.dtype)) or self._plan(x))(x)

    def _plan(self, x: mx.array):
        gate, up = self.gate_proj, self.up_proj
        fused = geglu_plan(gate.path, gate.on, x, gate["weight"], gate["scales"], gate["biases"], gate.group_size,
                           gate.bits)
        if fused is None:
            found = partial(MLP.__call__, self)
        else:
            def found(x):
                y = fused(x, gate["weight"], gate["scales"], gate["biases"], up["weight"], up["scales"], up["biases"])
                return self.down_proj(y)
        self.plans[x.shape, x.dtype] = found
        return found


def _fusable(mlp: MLP) -> bool:
    gate, up = mlp.gate_proj, mlp.up_proj
    return (isinstance(gate, QuantizedLinear) and isinstance(up, QuantizedLinear) and gate.mode == up.mode == "affine"
            and (gate.group_size, gate.bits) == (up.group_size, up.bits) and gate.weight.shape == up.weight.shape
            and "bias" not in gate and "bias" not in up)


_OURS = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def _twin(cls, module: nn.Module, path: str, on: str) -> _Planned:
    """A `cls` holding `module`'s arrays and settings, with no plans yet."""
    twin = cls.__new__(cls)  # no __init__: it would quantize a random weight
    twin.__dict__.update(module.__dict__)  # group size, bits, mode, frozen state, ...
    dict.update(twin, module)  # the arrays: weight, scales, biases (, bias)
    twin._setup(path, on)
    return twin


def kernel_layers_wanted() -> bool:
    """Whether loaders swap our layers in: where the backend's dispatch table routes some shapes to our
    paths (CUDA), unless MLX_GEMMA4_QUANTIZED_MATMUL=mlx; elsewhere only when that variable names one of
    ours. On an H100 with prefill paced one layer ahead (benchmarks/results/2026-11-23-h100-4bit-*-our-
    qmm-layers-paced.md) our layers beat mlx-lm on every preset (pp512 / tg64: E2B 1.03x / 1.11x, 31B
    1.82x / 1.16x, 26B-A4B 2.83x / 1.33x) at a lower peak than mlx-lm's (31B 20.0 GB against 23.0; 36.6
    before the pacing)."""
    choice = os.environ.get(PATH_ENV)
    if choice is None:
        return bool(DISPATCH[backend()])
    return choice != "mlx"


def use_kernel_layers(model: nn.Module) -> nn.Module:
    """Swap every nn.QuantizedLinear / nn.QuantizedEmbedding of `model` for ours, in place, keeping
    its arrays (lazy ones stay lazy); returns `model`. Reads MLX_GEMMA4_QUANTIZED_MATMUL and the
    kernel backend now; layers already ours re-read them and drop their plans. MLPs whose gate and up
    projections become ours with one format become GegluMLPs (same parameters)."""
    path, on = os.environ.get(PATH_ENV, "auto"), backend()
    if path not in ("auto", *PATHS):
        raise ValueError(f"{PATH_ENV}={path!r}: choose one of {', '.join(PATHS)} or auto")

    def swap(_, module):
        if isinstance(module, _Planned):
            module._setup(path, on)
            return module
        ours = _OURS.get(type(module))
        if ours is None:
            return module
        return _twin(ours, module, path, on)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    for _, module in model.named_modules():
        for held in vars(module).values():  # fused projections (model/fused.py) hold a layer outside the tree
            if isinstance(getattr(held, "linear", None), _Planned):
                held.linear._setup(path, on)
        if isinstance(module, MLP) and _fusable(module):
            module.__class__ = GegluMLP
            module.__dict__["plans"] = {}
        if hasattr(module, "paced_from"):  # the decoder stacks (model/text.py: TextModel)
            module.paced_from = dequantizes_from(path, on)
    return model
