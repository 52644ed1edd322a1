"""The MoE experts for many tokens (prefill): each (token, expert) pair's GeGLU, weighted and summed.

    out[t] = Σ_k weights[t, k] · down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])),  e = indices[t, k]

the same semantics as moe_experts.py's reference; x [T, H], indices/weights [T, K], gate_up [E, 2I, H],
down [E, H, I], float or affine-quantized (moe_weights.Packed). Three ways, all without a Python loop
over experts, that differ in how the matmuls meet the tensor cores:

- `gathered`: pairs sorted by expert, MLX's gathered quantized matmuls (`gather_qmm` with sorted
  indices, what mlx-lm runs), unsorted. Quantized matmul tops out far below the dense one on a GPU.
- `dequantized`: the same sort, but the layer's experts dequantized into transient dense weights and
  `gather_mm(..., sorted_indices=True)`, which MLX's CUDA backend runs as one grouped GEMM.
- `padded`: the pairs scattered into [E, C, H] slots, C the largest expert's count (one host sync),
  then two batched dense matmuls with the dequantized weights and a weighted gather back.

Dense copies of a layer's experts are large (~1.5 GB in bfloat16 at 26B-A4B's dimensions), so they
are made from weights that depend on the layer's input (`mx.depends`): MLX cannot dequantize a later
layer's experts before this layer has run, and each copy is freed after its layer's matmuls.
`DISPATCH` says which way serves how many tokens on each backend.
"""

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .moe_weights import Packed


def gathered_matmul(w: Packed, x, indices, sorted_indices: bool) -> mx.array:
    """x [..., 1, n] times each row's expert `indices` of the stack w [E, out, n]: [..., 1, out]."""
    if w.quantized:
        return mx.gather_qmm(x, w.weight, w.scales, w.biases, rhs_indices=indices, transpose=True,
                             group_size=w.group_size, bits=w.bits, mode=w.mode, sorted_indices=sorted_indices)
    if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
        # MLX's CPU gather_mm takes float32 only: gather the chosen experts' matrices (few pairs here;
        # `prefill` sends many pairs of such weights to `padded`).
        return x @ w.weight[indices].swapaxes(-1, -2)
    return mx.gather_mm(x, w.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


@partial(mx.compile, shapeless=True)
def _gelu_times(gate, up):
    return nn.gelu_approx(gate) * up


def geglu(gate_up):
    """Shapeless, with the split outside: `padded` sizes its slots per layer and chunk, and a compiled
    function with shapes would be traced again for each."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return _gelu_times(gate, up)


def combine(pair_out, weights) -> mx.array:
    """[T * K, H] pair outputs in (token, slot) order -> [T, H] weighted sums."""
    tokens, k = weights.shape
    pair_out = pair_out.reshape(tokens, k, -1)
    return (pair_out * weights[..., None].astype(pair_out.dtype)).sum(axis=-2)


def sort_by_expert(indices):
    """(order, inverse, experts in order): pairs (flat t * K + k) sorted by their expert."""
    flat = indices.flatten()
    order = mx.argsort(flat)
    return order, mx.argsort(order), flat[order]


def sorted_rows(x, rows) -> mx.array:
    """x's `rows` as [R, 1, H] for the sorted gathered matmuls. A reshape, not `[:, None]`: MLX 0.32's
    sorted gather_mm reads an inserted axis's stride as the row stride and silently returns wrong rows
    (ml-explore/mlx#4253, #3960; seen on the H100: 1.2 relative error)."""
    return x[rows].reshape(rows.size, 1, x.shape[-1])


def dense_experts(w: Packed, after: mx.array) -> mx.array:
    """The float [E, out, n] stack of w, computed only once `after` exists (see module doc)."""
    if not w.quantized:
        return w.weight
    weight, scales, biases = mx.depends([w.weight, w.scales, w.biases], [after])
    return mx.dequantize(weight, scales, biases, w.group_size, w.bits, mode=w.mode)


def gathered(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """Sorted gathered (quantized) matmuls: x [T, H] -> [T, H]."""
    k = indices.shape[-1]
    order, inverse, experts = sort_by_expert(indices)
    xs = sorted_rows(x, order // k)
    act = geglu(gathered_matmul(gate_up, xs, experts, True))
    return combine(gathered_matmul(down, act, experts, True)[inverse, 0], weights)


def dequantized(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """Sorted gathered dense matmuls on the dequantized experts: x [T, H] -> [T, H]."""
    k = indices.shape[-1]
    order, inverse, experts = sort_by_expert(indices)
    xs = sorted_rows(x, order // k)
    w1 = dense_experts(gate_up, x).swapaxes(-1, -2)
    act = geglu(mx.gather_mm(xs, w1, rhs_indices=experts, sorted_indices=True))
    w2 = dense_experts(down, act).swapaxes(-1, -2)
    return combine(mx.gather_mm(act, w2, rhs_indices=experts, sorted_indices=True)[inverse, 0], weights)


# Slots per (token, expert) pair beyond which `padded` hands a layer to `dequantized`: an even spread
# of 2048 x 8 pairs over 128 experts pads to ~1.3x (largest count over mean); one expert taking every
# token would pad to E / K = 16x.
MAX_PADDING = 4


def padded(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """Per-expert slots [E, C, H] and two batched dense matmuls: x [T, H] -> [T, H].

    A pair's slot is its expert's row block plus its rank among that expert's pairs (its place in the
    sorted order minus where the expert's run starts); padding rows stay zero and are never read back.
    Routing so lopsided that the slots would exceed MAX_PADDING x the pairs (compute and memory grow
    with E x C) goes to `dequantized` instead.
    """
    num_experts, hidden, k = gate_up.weight.shape[0], x.shape[-1], indices.shape[-1]
    _, inverse, experts = sort_by_expert(indices)
    counts = mx.zeros((num_experts,), mx.int32).at[experts].add(1)
    starts = mx.cumsum(counts) - counts
    capacity = counts.max().item()  # the host sync: C sizes the slots
    if num_experts * capacity > MAX_PADDING * experts.size:
        return dequantized(x, indices, weights, gate_up, down)
    rank = mx.arange(experts.size) - starts[experts]
    slot = (experts.astype(mx.int32) * capacity + rank)[inverse]  # in (token, k) order
    slots = mx.zeros((num_experts * capacity, hidden), x.dtype)
    slots[slot] = x[mx.arange(slot.size) // k]
    w1 = dense_experts(gate_up, x).swapaxes(-1, -2)
    act = geglu(slots.reshape(num_experts, capacity, hidden) @ w1)
    w2 = dense_experts(down, act).swapaxes(-1, -2)
    out = (act @ w2).reshape(num_experts * capacity, -1)
    return combine(out[slot], weights)


PATHS = {"gathered": gathered, "dequantized": dequantized, "padded": padded}

# Rules (fewest tokens, most tokens, path) per backend, the first that matches the token count wins;
# none: `gathered`. CUDA, from benchmarks/results/moe.md (H100, 26B-A4B dims, 4-bit, µs per block):
# gathered / dequantized / padded 1124 / 4122 / 2931 at 32 tokens, 2973 / 4360 / 2922 at 128,
# 10426 / 4883 / 3420 at 512, 39618 / 6033 / 4798 at 2048. `padded` also syncs the host once per layer,
# which on CUDA lets the previous layer's dense experts be freed (with `dequantized` the 26B-A4B prefill
# peaked at 35.9 GB against mlx-lm's 17.0). Metal and the CPU: MLX's own gather.
INF = math.inf
DISPATCH = {
    "cuda": ((256, INF, "padded"),),
    "metal": (),
    "reference": (),
}


def path(on: str, tokens: int) -> str:
    return next((name for fewest, most, name in DISPATCH[on] if fewest <= tokens <= most), "gathered")


def prefill(on: str, x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """x [..., H], indices/weights [..., K] -> [..., H], on backend `on`'s path for this many tokens."""
    lead, hidden = x.shape[:-1], x.shape[-1]
    tokens = x.size // hidden
    name = path(on, tokens)
    if not gate_up.quantized and x.dtype != mx.float32 and mx.default_device() == mx.cpu:
        name = "padded"  # the only path that takes these on MLX's CPU without copying an expert per pair
    run = PATHS[name]
    out = run(x.reshape(tokens, hidden), indices.reshape(tokens, -1), weights.reshape(tokens, -1), gate_up, down)
    return out.reshape(*lead, hidden)
