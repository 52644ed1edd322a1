"""The per-head norms + RoPE kernel on a real GPU through its plan, against MLX's unfused ops on the device
(whose RoPE computes in float and rounds once, as the kernel does), and a model's decode steps through it.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_head_norm_rope_on_device.py -m gpu
"""

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import head_norm_rope as hr

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() != "cuda", reason="the kernel serves CUDA only (MLX_GEMMA4_KERNELS=cuda)"),
]

SHAPES = [(256, 32, 16), (512, 32, 4), (256, 8, 1), (512, 8, 1)]  # 31B sliding, global; E2B sliding, global


def unfused_on_device(q, k, v, wq, wk, offset, base, periods, dim):
    """MLX's own GPU ops, RoPE straight on the dtype (its GPU kernel computes in float)."""
    batch, length = q.shape[:2]
    heads = lambda x: x.reshape(batch, length, -1, dim).transpose(0, 2, 1, 3)
    rope = lambda x: mx.fast.rope(x, dim, traditional=False, base=base, scale=1.0, offset=offset, freqs=periods)
    return (rope(mx.fast.rms_norm(heads(q), wq, hr.EPS)), rope(mx.fast.rms_norm(heads(k), wk, hr.EPS)),
            mx.fast.rms_norm(heads(v), None, hr.EPS))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("freqs", [False, True], ids=["base", "proportional"])
@pytest.mark.parametrize("rows, offset", [(1, 0), (1, 4099), (1, 200000), (hr.TESTED_ROWS, 77)])
def test_kernel_matches_mlx_ops(dtype, shape, freqs, rows, offset):
    dim, q_heads, kv_heads = shape
    q, k, v, wq, wk = hr.case(dtype, dim, q_heads, kv_heads, rows, seed=rows + offset)
    base, periods = hr.probe_frequencies(dim, freqs)
    frequencies = hr.rope_frequencies(base, periods)
    run = hr.plan(q, k, v, wq, wk, frequencies, hr.EPS, dim)
    assert run is not None
    got = run(q, k, v, wq, wk, frequencies[1], offset)
    want = unfused_on_device(q, k, v, wq, wk, offset, base, periods, dim)
    assert hr.differences(got, want) is None
    if dtype == mx.bfloat16:
        assert min(mx.mean(g == w).item() for g, w in zip(got, want)) > 0.99


def test_decode_steps_of_a_model_take_the_kernel(monkeypatch):
    """A shrunk 31B-structured model in bf16: decode logits with the kernel are no farther from the float32
    model's than the unfused ops' (sixty random layers amplify any rounding step, so this and not a fixed
    tolerance), and the kernel did run on every KV-owning layer (no silent fallback)."""
    from benchmarks.kv_quant_step_ops import shrunk_model

    model = shrunk_model("31B")
    token = mx.array([[3], [5]], mx.int32)

    def decode():
        cache = model.make_cache()
        model(mx.array([[1, 2, 3, 4], [4, 3, 2, 1]], mx.int32), cache=cache)
        return mx.concatenate([model(token, cache=cache) for _ in range(3)], axis=1).astype(mx.float32)

    launched = []
    real = hr.launcher

    def counting(on):
        def launch(kernel, **call):
            launched.append(kernel.name)
            return real(on)(kernel, **call)
        return launch

    monkeypatch.setattr(hr, "launcher", counting)
    monkeypatch.setattr(hr, "_plans", {})
    decode()  # probes and plans
    launched.clear()
    fused = decode()
    assert launched.count(hr.head_norm_rope_kernel.name) == 4 * model.config.num_hidden_layers  # prefill (8 rows), 3 steps
    monkeypatch.setitem(hr.MOST_ROWS, "cuda", 0)
    monkeypatch.setattr(hr, "_plans", {})
    unfused = decode()
    model.set_dtype(mx.float32)  # the same weights, exactly
    truth = decode()
    error = lambda got: mx.abs(got - truth).max().item()
    assert error(fused) <= 1.25 * error(unfused) + 1e-3, (error(fused), error(unfused))
