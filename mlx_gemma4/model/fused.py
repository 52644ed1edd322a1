"""One matmul for several projections of one input: a layer's q/k/v (k_eq_v: q/k) and an MLP's gate/up.

A decode step on MLX's CUDA backend is bound by host time, and MLX's quantized matmul has a latency floor
of ~20 us even on small weights: one launch over the projections' concatenated output rows costs less
than two or three. A linear layer's output rows are independent (a quantized one's too, in every mode:
each row has its own groups of scales and biases), so `x @ concat(W_i).T` split along the last axis is
exactly each `x @ W_i.T`.

Parameters keep their names and values: after loading, each kind of array (weight, scales, biases,
bias) is concatenated once and evaluated, and the projections' own arrays become row slices of it, which
share its buffer (memory is not doubled). If any projection or array is later replaced (load_weights,
update, set_dtype, a module swap), the layer notices by identity and goes back to the separate
projections for good: old weights are never used.
"""

import copy

import mlx.core as mx
import mlx.nn as nn

# Exact types, and subclasses that say `fusable = True` (our kernel layers, model/quantized_linear.py): a
# subclass may hold state a concatenation would not carry over.
FUSABLE = (nn.Linear, nn.QuantizedLinear)
FORMAT = ("group_size", "bits", "mode")
ARRAYS = {"weight", "bias", "scales", "biases"}


class Projections:
    """`parent[name](x)` for each of `names`, apart. A layer holds one as a plain attribute (not a member,
    so parameters are unchanged) under `attribute`; fuse_projections puts a FusedProjections there."""

    def __init__(self, attribute: str, names: tuple):
        self.attribute, self.names = attribute, names

    def __call__(self, parent: nn.Module, x: mx.array) -> list:
        return [parent[name](x) for name in self.names]


class FusedProjections(Projections):
    """The same outputs as one matmul over arrays the projections hold views of."""

    def __init__(self, attribute: str, names: tuple, parent: nn.Module):
        super().__init__(attribute, names)
        self.members = tuple(parent[name] for name in names)
        keys = sorted(self.members[0])
        rows = [member["weight"].shape[0] for member in self.members]
        self.offsets = [sum(rows[: i + 1]) for i in range(len(rows) - 1)]  # where each but the first starts
        fused = {key: mx.concatenate([member[key] for member in self.members]) for key in keys}
        mx.eval(fused)
        views = {key: mx.split(fused[key], self.offsets) for key in keys}
        mx.eval(views)
        for index, member in enumerate(self.members):
            member.update({key: views[key][index] for key in keys})
        self.linear = copy.copy(self.members[0])  # its class and format, the fused arrays; no model member
        self.linear.update(fused)
        # What `current` checks by identity: each view in its member (each member in the parent: the call's).
        self.named = tuple(zip(names, self.members))
        self.views = tuple((member, key, member[key]) for member in self.members for key in keys)

    def current(self, parent: nn.Module) -> bool:
        """Whether each projection and each of its arrays is still the one fused (a plain loop: ~50 ns a
        check, faster here than all/map)."""
        for name, member in self.named:
            if parent[name] is not member:
                return False
        for member, key, view in self.views:
            if member[key] is not view:
                return False
        return True

    def __call__(self, parent: nn.Module, x: mx.array) -> list:
        if self.current(parent):
            return mx.split(self.linear(x), self.offsets, axis=-1)
        unfused = Projections(self.attribute, self.names)
        setattr(parent, self.attribute, unfused)  # for good: frees the fused arrays no projection holds
        return unfused(parent, x)


def fusable(members: list) -> bool:
    """One class of FUSABLE, one format, one input width, the same arrays (bias all or none) of one dtype."""
    first = members[0]
    if not (type(first) in FUSABLE or getattr(type(first), "fusable", False)):
        return False
    if any(type(m) is not type(first) for m in members):
        return False
    if any(set(m) != set(first) for m in members) or not set(first) <= ARRAYS:
        return False
    if any(m[k].dtype != first[k].dtype or m[k].shape[1:] != first[k].shape[1:] for m in members for k in first):
        return False
    return type(first) is nn.Linear or all(getattr(m, f) == getattr(first, f) for m in members for f in FORMAT)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse, in place, every layer's separate Projections (attention q/k/v, MLP gate/up) whose members agree
    in type and format; returns `model`. Evaluates the fused arrays layer by layer and frees what they
    replace, so call it once the weights are loaded and nothing else holds them."""
    for _, module in model.named_modules():
        for attribute, projections in list(vars(module).items()):
            if type(projections) is Projections and fusable([module[name] for name in projections.names]):
                setattr(module, attribute, FusedProjections(attribute, projections.names, module))
    return model
