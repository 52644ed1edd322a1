"""Rung (b) of the verification ladder: run a kernel's Metal source on the CPU with Metal semantics.

`run(kernel, **call)` takes a `Kernel` (mlx_gemma4.kernels.kernel) and the arguments of an
mx.fast.metal_kernel call, and returns the outputs as mx arrays: a drop-in launcher for the kernels'
dispatch code. It captures the exact source MLX generates for the call (metal_source.py), compiles it
once for the CPU against metal_emu.h (which describes the execution model), and runs it in a
subprocess, so that a crash or a hang fails one test. Inputs may be numpy views, to exercise strides.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

from metal_source import capture, rewrite, signature

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "metal_emu.h")
CXX = shutil.which("clang++-19")  # .ci/run installs it; the -Xclang precision flags need clang >= 17
# -O1 compiles in about a second and runs fast enough; half and bfloat round after every operation as
# on the GPU instead of computing in float.
FLAGS = ["-std=c++20", "-O1", "-w", "-Xclang", "-ffloat16-excess-precision=none",
         "-Xclang", "-fbfloat16-excess-precision=none"]
CACHE = os.environ.get("METAL_EMU_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlx-gemma4-metal-emu"))
NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
         mx.int32: np.int32, mx.uint32: np.uint32}  # bfloat16, which numpy lacks, travels as raw bits


class EmulatorError(RuntimeError):
    pass


def run(kernel, *, inputs, output_shapes, output_dtypes, seed: int = 0, timeout: float = 120, **call) -> list:
    source = capture(kernel.build("metal"), inputs=inputs, output_shapes=output_shapes,
                     output_dtypes=output_dtypes, **call)
    executable = _compile(source)
    buffers = _buffers(signature(source), kernel, inputs, output_shapes, output_dtypes)
    grid, threadgroup = call["grid"], call["threadgroup"]
    with tempfile.TemporaryDirectory() as folder:
        lines = [f"grid {' '.join(map(str, grid))}", f"threadgroup {' '.join(map(str, threadgroup))}", f"seed {seed}"]
        for index, (data, is_output) in enumerate(buffers):
            data.tofile(os.path.join(folder, str(index)))
            lines.append(f"buffer {data.nbytes} {int(is_output)}")
        with open(os.path.join(folder, "launch"), "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            done = subprocess.run([executable, folder], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EmulatorError(f"{kernel.name}: no progress in {timeout} s")
        if done.returncode < 0:
            raise EmulatorError(f"{kernel.name} died of signal {-done.returncode} (out-of-bounds access?)")
        if done.returncode:
            raise EmulatorError(f"{kernel.name}: {done.stderr.strip()}")
        outputs = [np.fromfile(os.path.join(folder, str(i)), np.uint8) for i, (_, out) in enumerate(buffers) if out]
    return [_to_mx(o, shape, dtype) for o, shape, dtype in zip(outputs, output_shapes, output_dtypes)]


def _compile(source: str) -> str:
    """An executable for this source, built once (cached under METAL_EMU_CACHE)."""
    sig = signature(source)
    kernel = rewrite(source, lambda i, kind, name, dims: f"auto& {name} = metal_emu::threadgroup_slot<{kind}{dims}>({i});")
    args = ", ".join(
        f"*({p.type[:-1]}*)buffers[{p.buffer}]" if p.type.endswith("&")
        else f"({p.type})buffers[{p.buffer}]" if p.buffer is not None
        else f"ids.{p.name}"
        for p in sig.params
    )
    program = (
        f'#include "{HEADER}"\n#line 1 "kernel.metal"\n{kernel}\n'
        f"void metal_emu::dispatch(const metal_emu::Thread& ids, void** buffers) {{\n"
        f"  {sig.function}{sig.template_args}({args});\n}}\n"
    )
    with open(HEADER) as f:
        key = hashlib.sha256("\0".join([program, f.read(), CXX, *FLAGS]).encode()).hexdigest()[:20]
    executable = os.path.join(CACHE, key)
    if not os.path.exists(executable):
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".cpp", dir=CACHE, delete=False) as f:
            f.write(program)
        built = subprocess.run([CXX, *FLAGS, f.name, "-o", f.name + ".out"], capture_output=True, text=True)
        os.unlink(f.name)
        if built.returncode:
            raise EmulatorError(f"the emulator cannot compile this kernel:\n{built.stderr}")
        os.replace(f.name + ".out", executable)  # atomic: parallel test runs may race here
    return executable


def _buffers(sig, kernel, inputs, output_shapes, output_dtypes) -> list:
    """(bytes, is_output) per buffer index, as MLX binds them: inputs, their shapes/strides/ndim, outputs."""
    by_name = {}
    for name, value in zip(kernel.inputs, inputs):
        data, strides = _layout(value, kernel.row_contiguous)
        by_name[name] = data
        by_name[f"{name}_shape"] = np.array(value.shape, np.int32)
        by_name[f"{name}_strides"] = np.array(strides, np.int64)
        by_name[f"{name}_ndim"] = np.array(len(value.shape), np.int32)
    for name, shape, dtype in zip(kernel.outputs, output_shapes, output_dtypes):
        size = int(np.prod(shape)) * dtype.size
        by_name[name] = np.full(size, 0xFF, np.uint8)  # poison: unwritten outputs read as NaN or -1
    buffers = sorted((p.buffer, p.name) for p in sig.params if p.buffer is not None)
    return [(by_name[name], name in kernel.outputs) for _, name in buffers]


def _layout(value, row_contiguous: bool):
    """(the bytes the kernel sees, strides in elements). A numpy view keeps its strides unless the
    kernel asks MLX for row-contiguous inputs; mx arrays arrive contiguous."""
    if isinstance(value, mx.array):
        value = np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value)
    if row_contiguous or not value.ndim:
        value = np.ascontiguousarray(value)
    strides = [s // value.itemsize for s in value.strides]
    if any(s < 0 for s in strides):
        raise ValueError("negative strides")
    span = 1 + sum((n - 1) * s for n, s in zip(value.shape, strides)) if value.size else 0
    flat = np.lib.stride_tricks.as_strided(value, shape=(span,), strides=(value.itemsize,))
    return np.array(flat), strides


def _to_mx(raw: np.ndarray, shape, dtype) -> mx.array:
    array = mx.array(raw.view(NUMPY[dtype]).reshape(shape))
    return array.view(dtype) if dtype == mx.bfloat16 else array
