"""The ladder has teeth: classic GPU-kernel bugs planted in the real decode-attention bodies are caught
by the type check and lint (rung a) or by the emulator (rung b)."""

import dataclasses

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from attention_cases import full
from metal_source import capture
from mlx_gemma4.kernels.decode_attention import attend, combine_kernel, partial_kernel, reference

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")


def mutant(kernel, old: str, new: str):
    assert old in kernel.source, old
    return dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})


def run_with(replacement, case, seed=0):
    """Decode attention on the emulator, `replacement` standing in for the kernel of the same pass."""

    def launch(kernel, **call):
        swapped = replacement if kernel.name + "_mutant" == replacement.name else kernel
        return metal_emu.run(swapped, seed=seed, **call)

    return attend(launch, case.queries, case.keys, case.values, case.scale, case.mask)


def source_of(replacement, case) -> str:
    captured = []

    def launch(kernel, **call):
        if kernel.name + "_mutant" == replacement.name:
            captured.append(capture(replacement.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    attend(launch, case.queries, case.keys, case.values, case.scale, case.mask)
    return captured[0]


@pytest.fixture(scope="module")
def case():
    # 1100 keys: 36 partials a row, so every simdgroup of the combine pass holds some
    return full(8, 1, 256, mx.float32, length=1100, padding=[0, 9])


def wrong(got, case) -> bool:
    want = reference(case.queries, case.keys, case.values, case.scale, case.mask)
    return not mx.allclose(got, want, atol=1e-4).item()


TYPE_ERRORS = {
    "write to an input": (partial_kernel, "const float sc = scale[0];", "q[0] = T(0); const float sc = scale[0];"),
    # MLX passes inputs under 8 elements in the constant address space
    "small input as a device pointer": (partial_kernel, "const float sc = scale[0];",
                                        "const device float* s = scale; const float sc = s[0];"),
    "threadgroup array as a device pointer": (combine_kernel, "float l = 0.0f;", "device float* w = weight; float l = 0.0f;"),
    "beyond the portable subset": (combine_kernel, "m = simd_max(m);", "m = simd_shuffle_xor(m, 1);"),
}


@pytest.mark.parametrize("bug", TYPE_ERRORS)
def test_type_check_catches(bug, case):
    assert metal_check.check(source_of(mutant(*TYPE_ERRORS[bug]), case))


def test_lint_catches_double(case):
    src = source_of(mutant(combine_kernel, "float l = 0.0f;", "float l = double(0.0f);"), case)
    assert not metal_check.check(src) and metal_check.lint(src)


EMULATOR_ERRORS = {
    "simd_sum in divergent lanes": (partial_kernel, "s[t][h] = simd_sum(s[t][h]);",
                                    "if (lane < 16) { s[t][h] = simd_sum(s[t][h]); }"),
    "return before a barrier": (combine_kernel, "float m = -1e30f;", "if (sg == 1) { return; } float m = -1e30f;"),
    "read past the end": (combine_kernel, "o_part[(first + p) * D + d]", "o_part[(first + p) * D + d + 2 * D]"),
}


@pytest.mark.parametrize("bug", EMULATOR_ERRORS)
def test_emulator_fails(bug, case):
    with pytest.raises(metal_emu.EmulatorError):
        run_with(mutant(*EMULATOR_ERRORS[bug]), case)


def test_emulator_limits_threadgroup_memory(case):
    with pytest.raises(metal_emu.EmulatorError, match="32 KiB"):
        run_with(mutant(combine_kernel, "threadgroup float weight[MAX_P];", "threadgroup float weight[9000];"), case)


BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 7])
def test_emulator_catches_a_missing_barrier(which, seed, case):
    """Dropping any of the combine pass's barriers gives wrong results, with the greedy schedule (seed 0)
    and with a shuffled one."""
    source = combine_kernel.source
    at = [i for i in range(len(source)) if source.startswith(BARRIER, i)][which]
    broken = dataclasses.replace(
        combine_kernel, name=combine_kernel.name + "_mutant",
        source=source[:at] + source[at + len(BARRIER):], _built={},
    )
    assert wrong(run_with(broken, case, seed), case)
