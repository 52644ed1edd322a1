"""The MoE block's math on the CPU (what runs without a GPU): the model's Router and Experts equal a
plain per-token computation, sorted (prefill) and unsorted (decode) paths agree, and quantized weights
reach the kernels' reference in the format they were written."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma4.kernels.moe_experts import SORT_THRESHOLD
from mlx_gemma4.model.moe import Experts, Router, packed

HIDDEN, INNER, EXPERTS, TOP_K = 128, 64, 16, 4


def block(bits=None):
    mx.random.seed(1)
    router, experts = Router(HIDDEN, EXPERTS, TOP_K, 1e-6), Experts(HIDDEN, INNER, EXPERTS)
    router.per_expert_scale = mx.random.uniform(0.5, 1.5, (EXPERTS,))
    router.scale = mx.random.uniform(0.5, 1.5, (HIDDEN,))
    if bits:
        nn.quantize(experts, 64, bits)
    return router, experts


def by_hand(router, experts, x):
    """numpy, one token and one expert at a time."""
    x = np.array(x, np.float64).reshape(-1, HIDDEN)
    proj = np.array(packed(router.proj).dense(), np.float64)
    gate_up = np.array(packed(experts.gate_up_proj).dense(), np.float64)
    down = np.array(packed(experts.down_proj).dense(), np.float64)
    outs = []
    for row in x:
        normed = row / np.sqrt((row**2).mean() + 1e-6) * np.array(router.scale) * HIDDEN**-0.5
        logits = proj @ normed
        chosen = np.argsort(-logits)[:TOP_K]
        weights = np.exp(logits[chosen] - logits[chosen].max())
        weights = weights / weights.sum() * np.array(router.per_expert_scale)[chosen]
        out = np.zeros(HIDDEN)
        for e, w in zip(chosen, weights):
            gate, up = np.split(gate_up[e] @ row, 2)
            gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
            out += w * (down[e] @ (gelu * up))
        outs.append(out)
    return np.stack(outs)


def test_block_matches_a_per_token_computation():
    router, experts = block()
    for tokens in (1, SORT_THRESHOLD // TOP_K + 3):  # the unsorted and the sorted path
        x = mx.random.normal((1, tokens, HIDDEN), key=mx.random.key(tokens))
        got = experts(x, *router(x))
        assert got.shape == x.shape
        np.testing.assert_allclose(np.array(got)[0], by_hand(router, experts, x), atol=2e-5, rtol=1e-4)


def test_quantized_experts_read_in_their_format():
    router, experts = block(bits=4)
    weight = packed(experts.gate_up_proj)
    assert (weight.bits, weight.group_size, weight.weight.dtype) == (4, 64, mx.uint32)
    x = mx.random.normal((1, 2, HIDDEN), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(experts(x, *router(x)))[0], by_hand(router, experts, x), atol=2e-5, rtol=1e-4)


def test_kernels_take_the_26b_a4b_shapes():
    """The decode kernels' `supports` accepts 26B-A4B's real block (else the GPU silently runs the reference)."""
    from mlx_gemma4.kernels import moe_experts, moe_router
    from mlx_gemma4.kernels.moe_weights import Packed

    def q(shape, bits):
        return Packed(mx.zeros((*shape[:-1], shape[-1] * bits // 32), mx.uint32), mx.zeros((*shape[:-1], shape[-1] // 64)),
                      mx.zeros((*shape[:-1], shape[-1] // 64)), bits, 64)

    x = mx.zeros((1, 1, 2816))
    assert moe_router.supports(x, q((128, 2816), 8), mx.ones((2816,)), mx.ones((128,)), 8)
    indices, weights = mx.zeros((1, 1, 8), mx.uint32), mx.zeros((1, 1, 8))
    assert moe_experts.supports(x, indices, weights, q((128, 1408, 2816), 4), q((128, 2816, 704), 4))
    assert not moe_experts.supports(mx.zeros((1, 9, 2816)), indices, weights, q((128, 1408, 2816), 4), q((128, 2816, 704), 4))


def test_every_prefill_path_keeps_parity_with_transformers(tmp_path, monkeypatch):
    """The tiny 26B-A4B-style checkpoint (8 experts, top-2), a batch of two 40-token prompts, each prefill
    path forced through the model's dispatch: logits equal transformers' within float32 tolerance."""
    import math

    from tiny import VARIANTS, oracle_logits, save_causal_lm

    from mlx_gemma4 import load_model
    from mlx_gemma4.kernels import moe_prefill

    folder = save_causal_lm("26b", tmp_path)
    ids = np.random.default_rng(2).integers(0, VARIANTS["26b"]["vocab_size"], (2, 40))
    want = oracle_logits(folder, ids)
    model = load_model(folder)
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "reference")
    ran = []
    for name, run in list(moe_prefill.PATHS.items()):
        monkeypatch.setitem(moe_prefill.DISPATCH, "reference", ((1, math.inf, name),))
        monkeypatch.setitem(moe_prefill.PATHS, name, lambda *args, run=run, name=name: ran.append(name) or run(*args))
        got = np.array(model(mx.array(ids, dtype=mx.int32)))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert ran == [name for name in moe_prefill.PATHS for _ in range(4)]  # each of the 4 MoE layers
