"""The fused residual + RMSNorm kernels on a real GPU through the public dispatch, against MLX's unfused
ops (on the device too), and a tiny model's decode steps through them.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_residual_norm_on_device.py -m gpu
"""

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import residual_norm as rn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() != "cuda", reason="the fused kernels serve CUDA only (MLX_GEMMA4_KERNELS=cuda)"),
]


@pytest.fixture(autouse=True)
def fused_on_cuda(monkeypatch):
    """The kernels serve up to TESTED_ROWS rows here, whatever the table's default (kernels/residual_norm.py)."""
    monkeypatch.setitem(rn.MOST_ROWS, "cuda", rn.TESTED_ROWS)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("dim", [1536, 2560, 2816, 5376])
@pytest.mark.parametrize("rows", [1, rn.TESTED_ROWS])
def test_kernels_match_unfused_ops(dtype, dim, rows):
    x, u, w1, w2, scalar = (a.reshape(rows, 1, dim) if a.size > dim else a for a in rn.case(dtype, dim, rows, seed=rows))
    assert rn.plan(rn.add_norm_kernel, x, u, w1, w2, rn.EPS) is not None
    assert rn.plan(rn.add_scaled_kernel, x, u, w1, scalar, rn.EPS) is not None
    cases = [(rn.add_norm(x, u, w1, w2, rn.EPS), rn.reference_add_norm(x, u, w1, w2, rn.EPS)),
             (rn.add_scaled(x, u, w1, rn.EPS, scalar), rn.reference_add_scaled(x, u, w1, rn.EPS, scalar)),
             (rn.add_scaled(x, u, w1, rn.EPS), rn.reference_add_scaled(x, u, w1, rn.EPS))]
    for got, want in cases:
        assert rn.differences(got, want) is None
        if dtype == mx.bfloat16:
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            assert min(mx.mean(g == w).item() for g, w in zip(got, want)) > 0.99


def test_decode_steps_of_a_model_take_the_kernels(monkeypatch):
    """A shrunk 31B-structured model: decode logits with the kernels equal the unfused ops' within bf16
    rounding, and the kernels did run (no silent fallback)."""
    from benchmarks.kv_quant_step_ops import shrunk_model

    model = shrunk_model("31B")
    token = mx.array([[3], [5]], mx.int32)

    def decode(cache):
        model(mx.array([[1, 2, 3, 4], [4, 3, 2, 1]], mx.int32), cache=cache)
        return mx.concatenate([model(token, cache=cache) for _ in range(3)], axis=1).astype(mx.float32)

    launched = []
    real = rn.launcher

    def counting(on):
        def launch(kernel, **call):
            launched.append(kernel.name)
            return real(on)(kernel, **call)

        return launch

    monkeypatch.setattr(rn, "launcher", counting)
    monkeypatch.setattr(rn, "_plans", {})
    decode(model.make_cache())  # probes and plans
    launched.clear()
    fused = decode(model.make_cache())
    assert launched.count(rn.add_norm_kernel.name) == 4 * model.config.num_hidden_layers
    monkeypatch.setattr(rn, "backend", lambda: "reference")
    want = decode(model.make_cache())
    assert mx.abs(fused - want).max().item() <= 0.05 * max(mx.abs(want).max().item(), 1.0)
