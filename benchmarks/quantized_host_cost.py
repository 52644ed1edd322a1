"""Host cost of one quantized linear call: building the graph node, no evaluation.

    python -m benchmarks.quantized_host_cost [--out FOLDER]

A decode step on MLX's CUDA backend is bound by host time (~400 quantized matmuls a step), so what a
call costs in Python and C++ before any kernel runs decides decode speed. Timed, in µs per call:
- `nn.QuantizedLinear`: MLX's layer (the baseline);
- `ours (mlx path)`: our layer when its plan is MLX's op;
- `ours (gemv path, stand-in)`: our layer on the GEMV plan, with the kernel object replaced by a
  Python stand-in that returns a ready array, so this is our Python alone (runs on any machine);
- `stand-in alone`: the stand-in's own cost, to subtract;
- on a GPU, `ours (gemv path)`: the real kernel object, i.e. plus MLX's C++ cost of building a custom
  kernel call (its source string is rebuilt on every call);
- `metal kernel call, traced` vs `mx.quantized_matmul, traced`: the CPU build refuses to construct a
  cuda_kernel and to call a metal_kernel, except while tracing for mx.export_function; timed there,
  the Metal kernel call (source written out, its signature parsed) is a proxy of MLX's C++ cost.
Each figure is the best of 3 x 7 repeats of 10,000 calls (2,000 traced); other load makes medians noisy.
"""

import argparse
import json
import os
import tempfile
import time
import timeit
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.model.quantized_linear import use_kernel_layers

CALLS = 10_000
REPEATS = 7
K, N = 1536, 2048  # E2B q_proj


def us_per_call(fn) -> float:
    fn()
    return min(timeit.repeat(fn, number=CALLS, repeat=REPEATS)) / CALLS * 1e6


def measure() -> dict:
    dtype = mx.bfloat16
    holder = nn.Sequential(nn.QuantizedLinear(K, N, bias=False, group_size=64, bits=4))
    plain = holder.layers[0]
    x = mx.zeros((1, 1, K), dtype)
    results = {"nn.QuantizedLinear": us_per_call(lambda: plain(x))}

    ours = use_kernel_layers(nn.Sequential(nn.QuantizedLinear(K, N, bias=False, group_size=64, bits=4))).layers[0]
    ours._setup("mlx", backend())
    results["ours (mlx path)"] = us_per_call(lambda: ours(x))

    ready = mx.zeros((1, 1, N), dtype)
    stand_in = lambda **call: [ready]  # noqa: E731 - the kernel object's call signature
    results["stand-in alone"] = us_per_call(lambda: stand_in(
        inputs=[x, x, x, x], template=[], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1, 1, N)],
        output_dtypes=[dtype]))
    ours._setup("gemv", "cuda")
    ours.plans[x.shape, x.dtype] = qmm._gemv_plan(stand_in, x.shape, dtype, N, 64, 4)
    results["ours (gemv path, stand-in)"] = us_per_call(lambda: ours(x))
    if backend() != "reference":
        ours._setup("gemv", backend())
        results["ours (gemv path)"] = us_per_call(lambda: ours(x))
    results.update(traced_calls(x))
    return {name: round(us, 3) for name, us in results.items()}


def traced_calls(x, calls: int = 2000) -> dict:
    """µs per call of the GEMV's metal kernel object and of MLX's op, inside an export trace."""
    w, scales, biases = mx.quantize(mx.zeros((N, K), x.dtype), 64, 4)
    run = qmm._gemv_plan(qmm.gemv_kernel.build("metal"), x.shape, x.dtype, N, 64, 4)
    ops = {"metal kernel call, traced": run,
           "mx.quantized_matmul, traced": lambda *a: mx.quantized_matmul(*a, True, 64, 4)}
    us = {}

    def traced(*arrays):
        for _ in range(REPEATS):
            for name, op in ops.items():
                start = time.perf_counter()
                for _ in range(calls):
                    op(*arrays)
                us[name] = min(us.get(name, float("inf")), (time.perf_counter() - start) / calls * 1e6)
        return op(*arrays)

    with tempfile.TemporaryDirectory() as folder:
        mx.export_function(os.path.join(folder, "f.mlxfn"), traced, x, w, scales, biases)
    return us


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rounds = [measure() for _ in range(3)]  # interleaved, so that a burst of other load hits all alike
    best = {name: min(r[name] for r in rounds) for name in rounds[0]}
    result = dict(mlx=mx.__version__, backend=backend(), shape=[K, N], calls=CALLS, us_per_call=best)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantized_host_cost.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
