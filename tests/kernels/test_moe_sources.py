"""Rung (a) for the MoE kernels: the exact Metal source MLX generates for every configuration the models
use (26B-A4B's router and experts at its real dimensions; activations float32/float16/bfloat16; weights
float or affine 4/8-bit at group 32/64/128) type-checks with clang and passes the MSL lint. Plus the
ladder's teeth on these bodies: planted bugs the emulator (rung b) catches."""

import dataclasses
import re

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from moe_cases import experts_case, router_case
from test_metal_sources import METAL_ATTRIBUTES
from mlx_gemma4.kernels import moe_experts, moe_router
from mlx_gemma4.kernels.moe_weights import Packed
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE
from mlx_gemma4.presets import preset_config

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
WEIGHT_FORMATS = [(0, 0)] + [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]


def record(captured):
    def launch(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    return launch


def zeros_packed(shape, bits, group, dtype) -> Packed:
    """A weight of this format and shape (only its layout matters for the source)."""
    if not bits:
        return Packed(mx.zeros(shape, dtype))
    groups = (*shape[:-1], shape[-1] // group)
    return Packed(mx.zeros((*shape[:-1], shape[-1] * bits // 32), mx.uint32), mx.zeros(groups, dtype),
                  mx.zeros(groups, dtype), bits, group)


def sources(dtype, bits, group) -> list:
    config = preset_config("26B-A4B")
    hidden, inner, experts, k = config.hidden_size, config.moe_intermediate_size, config.num_experts, config.top_k_experts
    captured = []
    x = mx.zeros((1, hidden), dtype)
    router_bits = bits or 0  # the router's proj takes the same formats
    moe_router.run(record(captured), x, zeros_packed((experts, hidden), router_bits, group, dtype),
                   mx.ones((hidden,), dtype), mx.ones((experts,), dtype), k, 1e-6)
    moe_experts.run(record(captured), x, mx.zeros((1, k), mx.uint32), mx.zeros((1, k), mx.float32),
                    zeros_packed((2, 2 * inner, hidden), bits, group, dtype),
                    zeros_packed((2, hidden, inner), bits, min(group, 64) if group else 0, dtype))
    return captured


def test_every_configuration_typechecks_and_lints():
    configs = [(dtype, bits, group) for dtype in DTYPES for bits, group in WEIGHT_FORMATS]
    all_sources = {src for config in configs for src in sources(*config)}
    assert len(all_sources) == 3 * len(configs) - 3 * 2  # down at group 128 is down at group 64 (704 % 128)
    assert not (found := metal_check.problems(all_sources)), found


def test_bodies_use_only_index_names_the_cuda_prelude_defines():
    for kernel in [*moe_router.KERNELS.values(), *moe_experts.GATE_UP_KERNELS.values(), *moe_experts.DOWN_KERNELS.values()]:
        used = {name for name in METAL_ATTRIBUTES if re.search(rf"\b{name}\b", kernel.source)}
        assert used and all(re.search(rf"#define {name}\b", CUDA_PRELUDE) for name in used), (kernel.name, used)


def mutant(kernel, old: str, new: str):
    assert old in kernel.source, old
    return dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})


def swapping(replacement, seed=0):
    def launch(kernel, **call):
        return metal_emu.run(replacement if kernel.name + "_mutant" == replacement.name else kernel, seed=seed, **call)

    return launch


def router_problem(replacement, seed=0):
    case = router_case("q8-g64-bf16", tokens=2, hidden=256)
    got = moe_router.run(swapping(replacement, seed), case.x, case.proj, case.scale, case.per_expert_scale,
                         case.top_k, case.eps)
    return moe_router.mismatch(got, case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps)


def experts_problem(replacement, seed=0):
    case = experts_case("q4-g64-bf16", 2, hidden=256, inner=192)
    got = moe_experts.run(swapping(replacement, seed), case.x, case.indices, case.weights, case.gate_up, case.down)
    return moe_experts.mismatch(got, moe_experts.float32_reference(case.x, case.indices, case.weights,
                                                                   case.gate_up, case.down))


@pytest.mark.parametrize("seed", [0, 7])
def test_emulator_catches_a_missing_router_barrier(seed):
    """Without the barrier after the x² partial sums, some simdgroup reads another's unwritten sum."""
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);\n    float total"
    assert router_problem(mutant(moe_router.KERNELS[True], barrier, "float total"), seed)


def test_emulator_catches_a_wrong_nibble():
    """Codes 1 and 5 of each word read as 16 times themselves (the float16 pair's fix-up left out)."""
    assert experts_problem(mutant(moe_experts.GATE_UP_KERNELS[True], "0x00F000F0u, 0x64006400u), 0.0625f, -64.0f)",
                                  "0x00F000F0u, 0x64006400u), 1.0f, -1024.0f)"))


def test_emulator_catches_a_word_read_from_the_wrong_row():
    assert experts_problem(mutant(moe_experts.GATE_UP_KERNELS[True], "const uint word = q[3][j];",
                                  "const uint word = q[2][j];"))


def test_emulator_catches_a_chunk_given_its_words_group():
    """The group of a 16-byte chunk counted in words, as in the 4-byte chunks before: wrong from GS / 4 on."""
    assert experts_problem(mutant(moe_experts.DOWN_KERNELS[True], "VPC * (chunk) / GS", "4 * (chunk) / GS"))


def test_emulator_catches_a_down_pass_without_its_barrier():
    """The simdgroups' partial sums read before all are written (shuffled schedule)."""
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    down = moe_experts.DOWN_KERNELS[True]
    assert experts_problem(mutant(down, barrier, ""), seed=5)


def test_emulator_catches_a_dropped_routing_weight():
    assert experts_problem(mutant(moe_experts.DOWN_KERNELS[True], "acc[1] += weight * (", "acc[1] += ("))


def test_emulator_catches_top_k_clearing_other_lanes():
    """Every lane, not only the chosen expert's, clearing its slot drops other experts from the race."""
    assert router_problem(mutant(moe_router.KERNELS[True], "if (e % 32 == int(lane)) {", "if (true) {"))
