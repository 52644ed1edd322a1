"""The per-head norms + RoPE kernel (kernels/head_norm_rope.py) on the verification ladder: every
configuration's Metal source type-checks and lints; on the emulator it gives MLX's unfused ops for each
Gemma 4 attention shape (bf16 bit for bit but for the norms' summation order), both RoPE kinds, far
positions, shuffled schedules; planted bugs are caught; the plans; a tiny model decoding on the emulated
kernel gives transformers' logits (float32) and the unfused ops' (bf16); the CUDA twin compiles."""

import dataclasses
import functools
import os
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import metal_check
import metal_emu
from benchmarks.kernel_instructions import NVCC, cuda_source
from metal_source import capture
from mlx_gemma4.kernels import head_norm_rope as hr

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

EPS = hr.EPS
# (head dim, query heads, kv heads): 31B sliding and global, E2B sliding and global (shrunk head counts keep
# the emulator quick: the body treats each head alike), the tiny test models'.
SHAPES = [(256, 4, 2), (512, 4, 1), (256, 8, 1), (512, 8, 1), (64, 4, 2)]


def outputs(launch, dtype, shape, freqs: bool, rows: int = 1, offset: int = hr.PROBE_OFFSET, seed: int = 0):
    """(kernel outputs, unfused ops' outputs) on a case of `rows` positions."""
    dim, q_heads, kv_heads = shape
    q, k, v, wq, wk = hr.case(dtype, dim, q_heads, kv_heads, rows, seed)
    base, periods = hr.probe_frequencies(dim, freqs)
    got = hr.launches(launch, q, k, v, wq, wk, hr.rope_frequencies(base, periods), offset, EPS, dim)
    return got, hr.reference(q, k, v, wq, wk, EPS, offset, base, periods, dim)


# bf16 elements bit-equal to the unfused ops' at the least. MLX's CPU RoPE forms its angles its own way, so a
# few angles at far positions differ in their last float place from the CUDA expressions the body uses (the
# GPU tests hold it to MLX's CUDA RoPE at 99 %); a missed rounding step moves ~40 % of the elements.
LEAST_EQUAL = 0.97


def mismatch(got, want, dtype) -> str:
    """What is wrong with `got` against the unfused ops' `want`, or ''. bf16: within tolerance and
    LEAST_EQUAL of the elements bit-equal."""
    problem = hr.differences(got, want) or ""
    if not problem and dtype == mx.bfloat16:
        equal = min(mx.mean(g == w).item() for g, w in zip(got, want))
        problem = f"only {equal:.2%} bit-equal" if equal < LEAST_EQUAL else ""
    return problem


@pytest.mark.parametrize("freqs", [False, True], ids=["base", "proportional"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_matches_unfused_ops(shape, freqs):
    assert not mismatch(*outputs(metal_emu.run, mx.bfloat16, shape, freqs), mx.bfloat16)


@pytest.mark.parametrize("freqs", [False, True], ids=["base", "proportional"])
def test_float32_matches_unfused_ops(freqs):
    """Near positions: a float32 angle of thousands of radians is itself uncertain by ~1e-4 (its last place)."""
    assert not mismatch(*outputs(metal_emu.run, mx.float32, (256, 2, 1), freqs, offset=7), mx.float32)


@pytest.mark.parametrize("offset", [0, 131071])
def test_positions_and_rows(offset):
    """Three rows (a speculative step's positions offset..offset+2), the first position and a far one."""
    got, want = outputs(metal_emu.run, mx.bfloat16, (256, 4, 2), True, rows=3, offset=offset)
    assert got[0].shape == (1, 4, 3, 256) and got[1].shape == got[2].shape == (1, 2, 3, 256)
    assert not mismatch(got, want, mx.bfloat16)


def test_shuffled_schedule():
    run = functools.partial(metal_emu.run, seed=5)
    assert not mismatch(*outputs(run, mx.bfloat16, (512, 4, 1), False), mx.bfloat16)


def sources() -> set:
    captured = set()

    def record(kernel, **call):
        captured.add(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    for dtype in hr.DTYPES:
        for shape in SHAPES:
            for freqs in (False, True):
                outputs(record, dtype, shape, freqs)
    return captured


def test_every_configuration_typechecks_and_lints():
    found = sources()
    assert len(found) == len(hr.DTYPES) * len(SHAPES) * 2
    assert not (problems := metal_check.problems(found)), problems


BUGS = {
    "one simdgroup's sum": ("squares += across[s];", "squares = across[0];"),
    "mean over D - 1": ("squares / D + eps[0]", "squares / (D - 1) + eps[0]"),
    "no rounding before the weight": ("static_cast<float>(static_cast<T>(x1 * inv_rms))", "x1 * inv_rms"),
    "keys take the query weight": ("is_q ? wq[t + NT] : wk[t + NT]", "wq[t + NT]"),
    "rotation the other way": ("n1 * c - n2 * s", "n1 * c + n2 * s"),
    "position without the row": ("offset[0] + l", "offset[0]"),
    "frequency over D": ("static_cast<float>(NT)) * freq[0]", "static_cast<float>(D)) * freq[0]"),
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_are_caught(bug):
    old, new = BUGS[bug]
    kernel = hr.head_norm_rope_kernel
    assert old in kernel.source, old
    mutant = dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})
    run = lambda called, **call: metal_emu.run(mutant, **call)
    found = [mismatch(*outputs(run, mx.bfloat16, (256, 4, 2), freqs, rows=2), mx.bfloat16) for freqs in (False, True)]
    assert any(found)


@pytest.fixture
def emulated(monkeypatch):
    """The kernel routed as on CUDA, probes passed, each launch the emulator's; the kernel names launched."""
    launched = []

    def launch(kernel, **call):
        launched.append(kernel.name)
        return metal_emu.run(kernel, **call)

    monkeypatch.setattr(hr, "backend", lambda: "cuda")
    monkeypatch.setattr(hr, "usable", lambda key, probe: True)
    monkeypatch.setattr(hr, "launcher", lambda on: launch)
    monkeypatch.setattr(hr, "_plans", {})
    return launched


def test_plans(emulated, monkeypatch):
    """One plan per signature, reused; more rows than the table's, mixed dtypes, odd head dims or Metal: None."""
    q, k, v, wq, wk = hr.case(mx.bfloat16, 256, 4, 2, hr.TESTED_ROWS + 1)
    freqs = hr.rope_frequencies(10000.0, None)
    one = hr.plan(q[:, :1], k[:, :1], v[:, :1], wq, wk, freqs, EPS, 256)
    assert one is not None and hr.plan(q[:, 1:2], k[:, 1:2], v[:, 1:2], wq, wk, freqs, EPS, 256) is one
    assert hr.plan(q[:, :1], k[:, :1], v[:, :1], wq, wk, freqs, 1e-5, 256) is not one  # eps is in the signature
    assert hr.plan(q, k, v, wq, wk, freqs, EPS, 256) is None  # prefill-sized
    assert hr.plan(q[:, :1], k[:, :1], v[:, :1], wq.astype(mx.float32), wk, freqs, EPS, 256) is None
    assert hr.plan(q[:, :1, :96], k[:, :1, :96], v[:, :1, :96], wq[:96], wk[:96], freqs, EPS, 96) is None
    monkeypatch.setattr(hr, "backend", lambda: "metal")
    assert hr.plan(q[:, :1], k[:, :1], v[:, :1], wq, wk, freqs, EPS, 256) is None
    assert not emulated  # planning launches nothing


def test_probe_passes_on_the_emulator(emulated):
    assert hr._probe("cuda", mx.bfloat16, 256, 2, 1, False) is None
    assert hr._probe("cuda", mx.float16, 512, 8, 1, True) is None
    assert emulated == [hr.head_norm_rope_kernel.name] * 2


@pytest.fixture(scope="module", params=["31b", "e2b"])
def tiny_checkpoint(request, tmp_path_factory):
    from tests.tiny import VARIANTS, oracle_logits, save_causal_lm

    # Head dims the kernel takes (the tiny models' own 16 and 32 are below a simdgroup's pairs).
    folder = save_causal_lm(request.param, tmp_path_factory.mktemp(request.param), head_dim=64, global_head_dim=128)
    ids = np.random.default_rng(3).integers(0, VARIANTS[request.param]["vocab_size"], (1, 7))
    return folder, ids, oracle_logits(folder, ids)


def prefill_then_decode(model, ids, prompt: int = 4) -> np.ndarray:
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :prompt]), cache=cache)]
    steps += [model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(prompt, ids.shape[1])]
    return np.array(mx.concatenate(steps, axis=1).astype(mx.float32))


def test_tiny_model_on_the_kernel(tiny_checkpoint, emulated):
    """31B-like (sliding and k_eq_v global layers) and E2B-like (KV-shared layers keep MLX's ops) tiny
    models, a prefill of 4 rows then decode steps on the emulated kernel: float32 gives transformers'
    logits; bf16 is no farther from them than the unfused ops in bf16 (on the CPU these round RoPE's
    arithmetic to bf16 too, where the kernel and MLX's GPU kernels round once)."""
    from mlx_gemma4 import load_model

    folder, ids, expected = tiny_checkpoint
    model = load_model(folder)
    owners = model.config.first_kv_shared_layer
    got = prefill_then_decode(model, ids)
    assert emulated.count(hr.head_norm_rope_kernel.name) == 4 * owners  # every KV-owning layer, every call
    assert np.abs(got - expected).max() <= 1e-4

    model.set_dtype(mx.bfloat16)
    fused = prefill_then_decode(model, ids)
    with pytest.MonkeyPatch.context() as unfused:
        unfused.setattr(hr, "backend", lambda: "reference")
        want = prefill_then_decode(model, ids)
    assert np.abs(fused - got).max() <= np.abs(want - got).max()


@pytest.mark.skipif(not os.path.exists(NVCC), reason="needs nvcc")
def test_cuda_twin_compiles(tmp_path):
    """The body under the CUDA prelude, as MLX's CUDA backend would build it, compiles for sm_90."""
    launches = []

    def record(kernel, **call):
        launches.append(dict(call, kernel=kernel))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    for freqs in (False, True):
        outputs(record, mx.bfloat16, (512, 32, 4), freqs)
    for index, launch in enumerate(launches):
        source = tmp_path / f"{index}.cu"
        source.write_text(cuda_source(launch))
        built = subprocess.run([NVCC, "-arch=sm_90", "-ptx", str(source), "-o", str(tmp_path / f"{index}.ptx")],
                               capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-2000:]
