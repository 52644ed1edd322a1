"""The fused residual + RMSNorm kernels (kernels/residual_norm.py) on the verification ladder: every
configuration's Metal source type-checks and lints; on the emulator both bodies give MLX's unfused ops
for every preset's hidden size (bf16 bit for bit but for a different summation order's rare last-place
steps), shuffled schedules included; planted bugs are caught; the plans; a tiny model decoding on the
emulated kernels gives transformers' logits (float32) and the unfused ops' (bf16)."""

import dataclasses
import functools
import os
import re
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import metal_check
import metal_emu
from benchmarks.kernel_instructions import NVCC, cuda_source
from metal_source import capture
from mlx_gemma4.kernels import residual_norm as rn
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE
from mlx_gemma4.presets import PRESETS, preset_config

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")


@pytest.fixture(autouse=True)
def fused_on_cuda(monkeypatch):
    """The kernels serve CUDA up to TESTED_ROWS rows here, whatever the table's default."""
    monkeypatch.setitem(rn.MOST_ROWS, "cuda", rn.TESTED_ROWS)

HIDDEN = [1536, 2560, 2816, 5376]  # E2B, E4B, 26B-A4B, 31B
EPS = rn.EPS


def test_hidden_sizes_are_the_presets():
    assert sorted({preset_config(name).hidden_size for name in PRESETS}) == HIDDEN


def mismatch(got, want, dtype) -> str:
    """What is wrong with `got` against the unfused ops' `want`, or ''. bf16: within tolerance and 99 % of
    the elements bit-equal (only the norms' summation order differs)."""
    problem = rn.differences(got, want) or ""
    if not problem and dtype == mx.bfloat16:
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        equal = min(mx.mean(g == w).item() for g, w in zip(got, want))
        problem = f"only {equal:.2%} bit-equal" if equal < 0.99 else ""
    return problem


def outputs(launch, which: str, dtype, dim: int, shape=(3,), seed: int = 0):
    """(kernel outputs, unfused ops' outputs) of `which` (norm, scaled, plain) on a case of rows `shape`."""
    x, u, w1, w2, scalar = (a.reshape(*shape, dim) if a.size > dim else a for a in rn.case(dtype, dim, int(np.prod(shape)), seed))
    if which == "norm":
        return rn.launches(launch, rn.add_norm_kernel, x, u, w1, w2, EPS), rn.reference_add_norm(x, u, w1, w2, EPS)
    scalar = scalar if which == "scaled" else None
    return rn.launches(launch, rn.add_scaled_kernel, x, u, w1, scalar, EPS), rn.reference_add_scaled(x, u, w1, EPS, scalar)


@pytest.mark.parametrize("dim", HIDDEN)
@pytest.mark.parametrize("which", ["norm", "scaled"])
def test_bf16_matches_unfused_ops(dim, which):
    assert not mismatch(*outputs(metal_emu.run, which, mx.bfloat16, dim), mx.bfloat16)


@pytest.mark.parametrize("dim", [1536, pytest.param(2816, marks=pytest.mark.slow), 5376])
@pytest.mark.parametrize("which", ["norm", "scaled", pytest.param("plain", marks=pytest.mark.slow)])
def test_float32_matches_unfused_ops(dim, which):
    assert not mismatch(*outputs(metal_emu.run, which, mx.float32, dim), mx.float32)


def test_unscaled_and_batched_rows():
    """No scalar (the PLE layers' middle add), rows as a decode batch shapes them [B, 1, D]."""
    got, want = outputs(metal_emu.run, "plain", mx.bfloat16, 2816, shape=(4, 1))
    assert got.shape == (4, 1, 2816) and not mismatch(got, want, mx.bfloat16)


def test_shuffled_schedule():
    assert not mismatch(*outputs(functools.partial(metal_emu.run, seed=3), "norm", mx.bfloat16, 2816), mx.bfloat16)


def sources() -> set:
    captured = set()

    def record(kernel, **call):
        captured.add(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    for dtype in rn.DTYPES:
        for dim in HIDDEN:
            for which in ("norm", "scaled", "plain"):
                outputs(record, which, dtype, dim)
    return captured


def test_every_configuration_typechecks_and_lints():
    found = sources()
    assert len(found) == len(rn.DTYPES) * len(HIDDEN) * 3
    assert not (problems := metal_check.problems(found)), problems


@pytest.mark.parametrize("kernel", [rn.add_norm_kernel, rn.add_scaled_kernel], ids=lambda k: k.name)
def test_bodies_use_only_index_names_the_cuda_prelude_defines(kernel):
    used = set(re.findall(r"\b(thread_index_in_\w+|simdgroup_index_in_threadgroup|threadgroup_position_in_grid)\b",
                          kernel.source))
    assert used and all(re.search(rf"#define {name}\b", CUDA_PRELUDE) for name in used), used


BUGS = {
    "padding counted in h's norm": (rn.add_norm_kernel, "norm", "squares += t + c * NT < D ? h[c] * h[c] : 0.0f;",
                                    "squares += h[c] * h[c];"),
    "mean over D - 1": (rn.add_scaled_kernel, "scaled", "squares / D + epsilon", "squares / (D - 1) + epsilon"),
    "no rounding before the weight": (rn.add_norm_kernel, "norm",
                                      "static_cast<float>(static_cast<T>(h[c] * inv_rms))", "h[c] * inv_rms"),
    "one simdgroup's sum": (rn.add_scaled_kernel, "scaled", "value += scratch[s];", "value = scratch[0];"),
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_are_caught(bug):
    kernel, which, old, new = BUGS[bug]
    assert old in kernel.source, old
    mutant = dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})

    def launch(called, **call):
        return metal_emu.run(mutant if called is kernel else called, **call)

    assert mismatch(*outputs(launch, which, mx.bfloat16, 2816), mx.bfloat16)


@pytest.fixture
def emulated(monkeypatch):
    """The fused kernels routed as on CUDA, probes passed, each launch the emulator's; the kernel names
    launched, in order."""
    launched = []

    def launch(kernel, **call):
        launched.append(kernel.name)
        return metal_emu.run(kernel, **call)

    monkeypatch.setattr(rn, "backend", lambda: "cuda")
    monkeypatch.setattr(rn, "usable", lambda key, probe: True)
    monkeypatch.setattr(rn, "launcher", lambda on: launch)
    monkeypatch.setattr(rn, "_plans", {})
    return launched


def test_plans(emulated, monkeypatch):
    """One plan per signature, reused; more rows than the table's, mixed dtypes or Metal: the unfused ops."""
    x, u, w1, w2, scalar = rn.case(mx.bfloat16, 64, rn.TESTED_ROWS + 1)
    one = rn.plan(rn.add_norm_kernel, x[:1], u[:1], w1, w2, EPS)
    assert one is not None and rn.plan(rn.add_norm_kernel, x[1:2], u[1:2], w1, w2, EPS) is one
    assert rn.plan(rn.add_norm_kernel, x[:1], u[:1], w1, w2, 1e-5) is not one  # eps is part of the signature
    assert rn.plan(rn.add_scaled_kernel, x[:2], u[:2], w1, scalar, EPS) is not None
    assert rn.plan(rn.add_norm_kernel, x, u, w1, w2, EPS) is None  # prefill-sized
    assert rn.plan(rn.add_norm_kernel, x[:1], u[:1], w1.astype(mx.float32), w2, EPS) is None
    assert rn.plan(rn.add_scaled_kernel, x[:1], u[:1], w1, scalar.astype(mx.float32), EPS) is None
    assert rn.plan(rn.add_scaled_kernel, x[:1], u[:1], w1, w2, EPS) is None  # a scalar has one element
    monkeypatch.setattr(rn, "backend", lambda: "metal")
    assert rn.plan(rn.add_norm_kernel, x[:1], u[:1], w1, w2, EPS) is None
    assert not emulated  # planning launches nothing


def test_probe_passes_on_the_emulator(emulated):
    assert rn._probe(rn.add_norm_kernel.name, "cuda", mx.bfloat16, 2816) is None
    assert rn._probe(rn.add_scaled_kernel.name, "cuda", mx.float32, 1536) is None
    assert emulated == [rn.add_norm_kernel.name, rn.add_scaled_kernel.name]


@pytest.fixture(scope="module", params=["31b", "e2b"])
def tiny_checkpoint(request, tmp_path_factory):
    from tests.tiny import VARIANTS, oracle_logits, save_causal_lm

    folder = save_causal_lm(request.param, tmp_path_factory.mktemp(request.param))
    ids = np.random.default_rng(2).integers(0, VARIANTS[request.param]["vocab_size"], (2, 7))
    return folder, ids, oracle_logits(folder, ids)


def prefill_then_decode(model, ids, prompt: int = 4) -> np.ndarray:
    """Logits of a batch: the first `prompt` tokens at once, then one token a step."""
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :prompt]), cache=cache)]
    steps += [model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(prompt, ids.shape[1])]
    return np.array(mx.concatenate(steps, axis=1).astype(mx.float32))


def test_tiny_model_on_the_kernels(tiny_checkpoint, emulated):
    """31B-like (dense) and E2B-like (PLE: two fused adds at the end) tiny models, batch 2, prefill of 4
    rows a sequence and decode steps all on the emulated kernels: float32 gives transformers' logits,
    bf16 the unfused ops' within a quarter of bf16's own error."""
    from mlx_gemma4 import load_model

    folder, ids, expected = tiny_checkpoint
    model = load_model(folder)
    layers, ple = model.config.num_hidden_layers, model.config.has_ple
    got = prefill_then_decode(model, ids)
    assert emulated.count(rn.add_norm_kernel.name) == 4 * layers  # every layer, every call
    assert emulated.count(rn.add_scaled_kernel.name) == 4 * layers * (2 if ple else 1)
    assert np.abs(got - expected).max() <= 1e-4

    model.set_dtype(mx.bfloat16)
    fused = prefill_then_decode(model, ids)
    with pytest.MonkeyPatch.context() as unfused:
        unfused.setattr(rn, "backend", lambda: "reference")
        want = prefill_then_decode(model, ids)
    # Far closer to the unfused ops than bf16 itself is to float32 (31B-like: bit-equal here; E2B-like: 58 %
    # of the logits bit-equal, a last-place step of a norm carried through six layers).
    assert np.abs(fused - want).max() <= 0.25 * np.abs(want - got).max()


@pytest.mark.skipif(not os.path.exists(NVCC), reason="needs nvcc")
def test_cuda_twin_compiles(tmp_path):
    """Both bodies under the CUDA prelude, as MLX's CUDA backend would build them, compile for sm_90."""
    launches = []

    def record(kernel, **call):
        launches.append(dict(call, kernel=kernel))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    for which in ("norm", "scaled", "plain"):
        outputs(record, which, mx.bfloat16, 5376)
    for index, launch in enumerate(launches):
        source = tmp_path / f"{index}.cu"
        source.write_text(cuda_source(launch))
        built = subprocess.run([NVCC, "-arch=sm_90", "-ptx", str(source), "-o", str(tmp_path / f"{index}.ptx")],
                               capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-2000:]
