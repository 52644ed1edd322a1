"""Rungs (a) and (b) for prefill attention: the exact Metal source of every configuration the Gemma 4
presets use type-checks and lints, and bugs planted in the body are caught."""

import dataclasses
import re

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from prefill_cases import CHUNKS
from mlx_gemma4.kernels.prefill_attention import PREFILL, CausalMask, attend, kernel, reference
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE
from mlx_gemma4.presets import PRESETS, preset_config
from test_metal_sources import METAL_ATTRIBUTES

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")


def model_configs() -> set:
    """(head_dim, query heads per kv head, window) of every attention layer of every preset."""
    configs = set()
    for name in PRESETS:
        config = preset_config(name)
        for spec in config.layers:
            window = config.sliding_window if spec.is_sliding else None
            configs.add((spec.head_dim, config.num_attention_heads // spec.num_kv_heads, window))
    return configs


def source(dtype, dim, group, window) -> str:
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    queries = mx.zeros((1, group, 10, dim), dtype)
    keys = mx.zeros((1, 1, 30, dim), dtype)
    attend(record, queries, keys, keys, 1.0, CausalMask(window))
    return captured[0]


def test_every_model_configuration_typechecks_and_lints():
    configs = [(dtype, *config) for dtype in (mx.float32, mx.float16, mx.bfloat16) for config in model_configs()]
    assert len(configs) == 3 * 5  # sliding 8:1, 4:1 (window 512), 2:1 (1024); global 8:1, 4:1
    sources = [source(*config) for config in configs]
    assert not (found := metal_check.problems(sources)), found


def test_body_uses_only_index_names_the_cuda_prelude_defines():
    used = {name for name in METAL_ATTRIBUTES if re.search(rf"\b{name}\b", PREFILL)}
    assert used and all(re.search(rf"#define {name}\b", CUDA_PRELUDE) for name in used), used


def mutant(old: str, new: str):
    assert old in kernel.source, old
    return dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})


def run_mutant(broken, chunk):
    launch = lambda _, **call: metal_emu.run(broken, **call)  # noqa: E731
    return attend(launch, chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)


BUGS = {
    # chunks whose rows see a different set of keys than the model's mask
    "window one key too wide": ("sliding-256-8:1-bf16-wrapped", "hi[r] - WINDOW + 1", "hi[r] - WINDOW"),
    "causal off by one": ("full-512-16:2-bf16", "hi[r] = S - L + query[r];", "hi[r] = S - L + query[r] - 1;"),
    "padding ignored": ("full-512-8:1-fp16-padded", "metal::max(lo[r], first_valid)", "lo[r]"),
    "keys of the other kv head": ("full-512-16:2-bf16", "kvh * k_strides[1]", "((kvh + 1) % HKV) * k_strides[1]"),
    "stale running max": ("full-512-2:1-fp32-padded", "m[r] = m_new;", ""),
}


@pytest.mark.parametrize("bug", BUGS)
def test_emulator_catches(bug):
    name, old, new = BUGS[bug]
    chunk = CHUNKS[name]()
    got = run_mutant(mutant(old, new), chunk).astype(mx.float32)
    want = reference(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask).astype(mx.float32)
    assert not mx.allclose(got, want, atol=0.05).item()


def test_emulator_fails_on_divergent_simd_sum():
    broken = mutant("s[t][r] = simd_sum(s[t][r]);", "if (lane < 16) { s[t][r] = simd_sum(s[t][r]); }")
    with pytest.raises(metal_emu.EmulatorError):
        run_mutant(broken, CHUNKS["full-512-16:2-bf16"]())


def test_type_check_catches_a_write_to_an_input():
    src = source(mx.float16, 256, 2, 1024).replace("const float sc = scale[0];", "q[0] = T(0); const float sc = scale[0];")
    assert metal_check.check(src)
