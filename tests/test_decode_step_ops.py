"""One decode step's ops as a GPU builds them (benchmarks/decode_step_ops.py): fast ops count as one launch,
the per-part attribution adds up to the step, and a layer's glue stays fused."""

import mlx.core as mx
import pytest

from benchmarks.decode_step_ops import build_ms, gpu_graph, graph_ops, kinds, layer_parts, step
from benchmarks.kv_quant_speed import filled_cache
from benchmarks.kv_quant_step_ops import shrunk_model
from mlx_gemma4.kernels import residual_norm as rn


def test_a_fast_op_is_one_launch():
    x = mx.ones((1, 2, 1, 8))
    mx.eval(x)
    with gpu_graph():
        ops = kinds(graph_ops(mx.fast.rope(mx.fast.rms_norm(x + 1, None, 1e-6), 8, traditional=False, base=1e4,
                                           scale=1.0, offset=3)))
    assert ops == {"kernels": 0, "fast": 2, "mlx": 1, "launches": 3, "views": ops["views"]}


@pytest.mark.parametrize("fused_rows,glue_launches", [
    # the norms around the residuals (post-attention, pre-MLP, post-MLP, post-PLE), the attention and PLE
    # residual adds, the compiled last residual with the layer scalar, the PLE gate's GeGLU (2)
    (0, 9),
    # the fused residual + norm kernels (after attention, after the MLP, the last with the layer scalar),
    # the PLE gate's GeGLU (2)
    (rn.TESTED_ROWS, 5),
])
def test_layer_parts_add_up_to_the_step_and_glue_is_fused(monkeypatch, fused_rows, glue_launches):
    monkeypatch.setitem(rn.MOST_ROWS, "cuda", fused_rows)
    monkeypatch.setattr(rn, "_plans", {})
    with gpu_graph():
        model = shrunk_model("E2B")
        whole = step(model, filled_cache(model, None, 600))
        by_kind, counts = layer_parts(model, filled_cache(model, None, 600))
    in_layers = sum(sum(parts.values()) * counts[kind] for kind, parts in by_kind.items())
    outside = whole["launches"] - in_layers
    assert 0 < outside <= 16  # embeddings, PLE inputs, final norm, head, soft-cap
    glue = "layer glue (residuals, PLE gate, layer scalar)"
    assert all(parts[glue] == glue_launches for parts in by_kind.values())
    assert by_kind["sliding"]["KV cache update"] == 2 and by_kind["sliding KV reader"].get("KV cache update", 0) == 0


def test_build_times_are_interleaved_per_model_and_leave_gc_on():
    import gc

    with gpu_graph():
        model = shrunk_model("E2B")
        first, second = filled_cache(model, None, 600), filled_cache(model, None, 600)
        times = build_ms({"a": (model, first), "b": (model, second)}, repeats=2)
    assert set(times) == {"a", "b"} and all(0 < t < 1e4 for t in times.values())
    assert gc.isenabled()
    assert first[0].offset == second[0].offset == 600 + 3  # warm-up and two builds each, evaluated
