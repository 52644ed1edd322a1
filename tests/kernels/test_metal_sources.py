"""Rung (a): the exact Metal source MLX generates for every decode-attention configuration the Gemma 4
models use (head dims and GQA ratios of all presets, float32/float16/bfloat16, with and without a mask)
type-checks with clang against the Metal shim and passes the MSL lint; every Metal index name a body
uses is one the CUDA prelude defines."""

import re

import mlx.core as mx
import pytest

import metal_check
from metal_source import capture
from mlx_gemma4.kernels.decode_attention import COMBINE, PARTIAL, attend
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE
from mlx_gemma4.presets import PRESETS, preset_config

pytestmark = pytest.mark.skipif(not metal_check.CLANG, reason="needs clang-19")


def model_shapes() -> set:
    """(head_dim, query heads per kv head) of every attention layer of every preset."""
    shapes = set()
    for name in PRESETS:
        config = preset_config(name)
        shapes |= {(spec.head_dim, config.num_attention_heads // spec.num_kv_heads) for spec in config.layers}
    return shapes


def sources(dtype, dim, group, masked) -> list:
    """The Metal sources of both passes for one configuration."""
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    queries = mx.zeros((1, group, 1, dim), dtype)
    keys = mx.zeros((1, 1, 100, dim), dtype)
    attend(record, queries, keys, keys, 1.0, mx.ones((1, 100), mx.bool_) if masked else None)
    return captured


CONFIGS = [
    (dtype, dim, group, masked)
    for dtype in (mx.float32, mx.float16, mx.bfloat16)
    for dim, group in sorted(model_shapes())
    for masked in (False, True)
]


def test_model_shapes_are_covered():
    assert model_shapes() == {(256, 2), (256, 4), (256, 8), (512, 4), (512, 8)}


def test_every_configuration_typechecks_and_lints():
    all_sources = {src for config in CONFIGS for src in sources(*config)}  # combine repeats per dtype and dim
    assert len(all_sources) == len(CONFIGS) + 6
    assert not (found := metal_check.problems(all_sources)), found


# The thread-position attributes MLX's Metal wrapper declares when a body names them.
METAL_ATTRIBUTES = [
    "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup", "dispatch_threads_per_threadgroup",
    "grid_origin", "grid_size", "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
    "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup", "thread_execution_width",
    "thread_index_in_quadgroup", "thread_index_in_simdgroup", "thread_index_in_threadgroup",
    "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
    "threadgroups_per_grid", "threads_per_grid", "threads_per_simdgroup", "threads_per_threadgroup",
]


@pytest.mark.parametrize("body", [PARTIAL, COMBINE], ids=["partial", "combine"])
def test_bodies_use_only_index_names_the_cuda_prelude_defines(body):
    used = {name for name in METAL_ATTRIBUTES if re.search(rf"\b{name}\b", body)}
    assert used and all(re.search(rf"#define {name}\b", CUDA_PRELUDE) for name in used), used
