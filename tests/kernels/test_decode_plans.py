"""Decode attention's plans, cached per signature (decode_attention.plan): a changed backend (the
environment), signature or launcher takes a plan of its own, a growing cache keeps its plan and its key
count still sizes the launch, a mask of the wrong size or a failed probe takes the reference."""

import importlib

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import ENV, sdpa

decode = importlib.import_module("mlx_gemma4.kernels.decode_attention")


def record_launches(monkeypatch, module) -> list:
    """In `module`, every kernel probe passes and launches are recorded (backend, kernel, grid) and
    yield zeros; returns the record."""
    calls = []

    def launcher(on):
        def launch(kernel, *, grid, output_shapes, output_dtypes, **_):
            calls.append((on, kernel.name, grid))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]

        return launch

    monkeypatch.setattr(module, "launcher", launcher)
    monkeypatch.setattr(module, "usable", lambda key, probe: True)
    monkeypatch.setattr(module, "_plans", {})
    return calls


@pytest.fixture
def launches(monkeypatch):
    return record_launches(monkeypatch, decode)


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


def test_tq_attention_plans_per_signature(monkeypatch):
    """TurboQuant decode attention caches its plans the same way; `tq_attention` runs the plan's launches."""
    from mlx_gemma4.kernels import tq_attention
    from mlx_gemma4.turboquant.codec import TurboQuantCodec

    calls = record_launches(monkeypatch, tq_attention)
    four, three = TurboQuantCodec(128, 4, 0), TurboQuantCodec(128, 3, 1)
    q = mx.zeros((1, 8, 1, 128), mx.bfloat16)
    encoded = {(keys, codec.bits): codec.encode(mx.zeros((1, 1, keys, 128))) for keys in (100, 5000) for codec in (four, three)}
    monkeypatch.setenv(ENV, "cuda")  # after the encodes (their own kernels would probe)

    def rows(keys, codec=four):
        return encoded[keys, codec.bits]

    run = tq_attention.plan(q, rows(100), four, four, None, None)
    assert run is not None and tq_attention.plan(q, rows(5000), four, four, None, None) is run
    others = [tq_attention.plan(q, rows(100, three), three, four, None, None),
              tq_attention.plan(q, rows(100), four, three, None, None),
              tq_attention.plan(q, rows(100), four, four, mx.ones((1, 1, 1, 100), mx.bool_), None),
              tq_attention.plan(q.astype(mx.float16), rows(100), four, four, None, None)]
    assert None not in others and len({id(p) for p in others + [run]}) == 5
    tq_attention.tq_attention(q, rows(100), rows(100), four, four, 1.0, None)
    tq_attention.tq_attention(q, rows(5000), rows(5000), four, four, 1.0, None)
    assert [name for _, name, _ in calls] == ["tq_attention_partial", "tq_attention_combine"] * 2
    assert calls[0][2][1] < calls[2][2][1]  # chunks follow the key count
    monkeypatch.setenv(ENV, "reference")
    assert tq_attention.plan(q, rows(100), four, four, None, None) is None
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setattr(tq_attention, "usable", lambda key, probe: False)
    assert tq_attention.plan(q, rows(100), four, four, None, mx.zeros(1)) is None  # a new signature, failed probe
    monkeypatch.setattr(tq_attention, "usable", lambda key, probe: True)
    assert tq_attention.plan(q, rows(100), four, four, None, mx.zeros(1)) is not None  # not cached as failed


def test_tq_encode_plans_per_signature(monkeypatch):
    """The encoder caches its plan per (head dim, dtype, bits), not per row count; a planned call launches
    what `run` launches and shapes its rows as the input."""
    from mlx_gemma4.kernels import tq_encode
    from mlx_gemma4.turboquant.codec import TurboQuantCodec

    calls = record_launches(monkeypatch, tq_encode)
    codec = TurboQuantCodec(128, 4, 0)
    monkeypatch.setenv(ENV, "cuda")
    one, chunk = mx.zeros((1, 2, 1, 128), mx.bfloat16), mx.zeros((1, 2, 37, 128), mx.bfloat16)
    run = tq_encode.plan(one, 4)
    assert run is not None and tq_encode.plan(chunk, 4) is run
    others = [tq_encode.plan(one, 3), tq_encode.plan(one.astype(mx.float16), 4), tq_encode.plan(mx.zeros((1, 256)), 4)]
    assert None not in others and len({id(p) for p in others + [run]}) == 4
    rows = codec.encode(chunk)
    assert rows.shape == (1, 2, 37, codec.words + 1) and rows.dtype == mx.uint32
    tq_encode.run(tq_encode.launcher("cuda"), chunk, codec.sign, codec.centroids, codec.boundaries, 4)
    assert calls[0] == calls[1] and calls[0][2][0] > 0
    monkeypatch.setenv(ENV, "reference")
    assert tq_encode.plan(one, 4) is None
