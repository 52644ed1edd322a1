"""Decode attention's plans, cached per signature (decode_attention.plan): a changed backend (the
environment), signature or launcher takes a plan of its own, a growing cache keeps its plan and its key
count still sizes the launch, a mask of the wrong size or a failed probe takes the reference."""

import importlib

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import ENV, sdpa

decode = importlib.import_module("mlx_gemma4.kernels.decode_attention")


@pytest.fixture
def launches(monkeypatch):
    """Every kernel probe passes; launches are recorded (backend, kernel, grid) and yield zeros."""
    calls = []

    def launcher(on):
        def launch(kernel, *, grid, output_shapes, output_dtypes, **_):
            calls.append((on, kernel.name, grid))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]

        return launch

    monkeypatch.setattr(decode, "launcher", launcher)
    monkeypatch.setattr(decode, "usable", lambda key, probe: True)
    monkeypatch.setattr(decode, "_plans", {})
    return calls


def inputs(keys=300, heads=8, kv_heads=1, dim=256, dtype=mx.bfloat16, batch=1):
    q = mx.zeros((batch, heads, 1, dim), dtype)
    k = mx.zeros((batch, kv_heads, keys, dim), dtype)
    return q, k, k


def test_backend_from_the_environment_picks_the_plan(monkeypatch, launches):
    monkeypatch.setenv(ENV, "cuda")
    on_cuda = decode.plan(*inputs())
    monkeypatch.setenv(ENV, "metal")
    on_metal = decode.plan(*inputs())
    assert on_cuda is not None and on_metal is not None and on_cuda is not on_metal
    on_metal(*inputs(), 1.0, None)
    assert {on for on, _, _ in launches} == {"metal"}
    monkeypatch.setenv(ENV, "reference")
    assert decode.plan(*inputs()) is None


def test_one_plan_per_signature_and_the_key_count_sizes_the_launch(monkeypatch, launches):
    monkeypatch.setenv(ENV, "cuda")
    short, long = inputs(keys=100), inputs(keys=5000)
    run = decode.plan(*short)
    assert decode.plan(*long) is run  # a growing cache keeps its plan
    run(*short, 1.0, None)
    run(*long, 1.0, None)
    short_chunks, long_chunks = launches[0][2][1], launches[2][2][1]
    assert short_chunks < long_chunks  # partial pass: chunks follow the key count
    others = [inputs(dtype=mx.float16), inputs(heads=16), inputs(kv_heads=2, heads=16), inputs(dim=512), inputs(batch=2)]
    plans = [decode.plan(*other) for other in others] + [decode.plan(*short, mx.ones((1, 1, 1, 100), mx.bool_))]
    assert None not in plans and len({id(p) for p in plans + [run]}) == len(plans) + 1
    monkeypatch.setattr(decode, "launcher", lambda on: None)  # a swapped launcher (the benchmarks' stand-in)
    assert decode.plan(*short) is not run


def test_unsupported_inputs_and_wrong_masks_take_the_reference(monkeypatch, launches):
    monkeypatch.setenv(ENV, "cuda")
    q, k, v = inputs(keys=100)
    assert decode.plan(q, k, v, mx.ones((1, 1, 1, 100), mx.bool_)) is not None
    assert decode.plan(q, k, v, mx.ones((1, 1, 1, 99), mx.bool_)) is None  # same signature, wrong size
    assert decode.plan(q, k, v, mx.ones((1, 1, 1, 100), mx.float32)) is None
    assert decode.plan(*inputs(dim=200)) is None
    assert decode.plan(q.astype(mx.float32), k, v) is None


def test_a_failed_probe_is_not_cached(monkeypatch, launches):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setattr(decode, "usable", lambda key, probe: False)
    assert decode.plan(*inputs()) is None
    monkeypatch.setattr(decode, "usable", lambda key, probe: True)  # e.g. the verdicts reset by a test
    assert decode.plan(*inputs()) is not None


def test_model_hook_runs_the_plan_for_decode_and_mlx_beyond_its_crossover(monkeypatch, launches):
    monkeypatch.setenv(ENV, "cuda")
    q, k, v = inputs(keys=100)
    sdpa.scaled_dot_product_attention(q, k, v, 1.0, None)
    assert [name for _, name, _ in launches] == ["decode_attention_partial", "decode_attention_combine"]
    long = inputs(keys=sdpa.SINGLE_KV_HEAD_MAX_KEYS + 1, dim=128)
    want = mx.fast.scaled_dot_product_attention(*long, scale=1.0)
    assert mx.array_equal(sdpa.scaled_dot_product_attention(*long, 1.0, None), want).item()
    assert len(launches) == 2
