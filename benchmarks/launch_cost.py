"""Host cost of one launch on MLX's GPU backend: a built-in op against `mx.fast` custom kernels.

    python -m benchmarks.launch_cost [--out FILE]

A decode step is a chain of ~1000 small launches, and on MLX's CUDA backend the host's work per launch
bounds it. For a chain of CHAIN launches of one kind, each reading the previous one's output, this times
- build: constructing the graph (Python and MLX's C++, no evaluation);
- encode: `mx.async_eval` of the chain, which returns once every launch is encoded for the GPU;
- run: a synchronous `mx.eval` of a fresh chain (encode plus waiting for the GPU),
in µs per launch, best of REPEATS. The kinds: `x * c` (a built-in elementwise op); a custom kernel doing
the same with a one-line source; the same body behind our CUDA prelude; that one padded with a comment
block the size of our largest kernel source (MLX hashes a custom kernel's whole source on every eval
and rebuilds it on every call). The gaps between the custom-kernel rows are what source length costs.
"""

import argparse
import json
import time

import mlx.core as mx

from mlx_gemma4.kernels.kernel import backend
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE, METAL_PRELUDE

from .attention import device_name

CHAIN = 1000
REPEATS = 7
SIZE = 4096
BODY = "unsigned int i = thread_position_in_grid.x; y[i] = x[i] * static_cast<T>(1.0001f);"
PADDING = "// " + "x" * 77 + "\n"  # 80 bytes a line
PADDED_BYTES = 12_000  # about our largest body plus the prelude


def custom(header: str, name: str):
    make = mx.fast.cuda_kernel if backend() == "cuda" else mx.fast.metal_kernel
    source = BODY if backend() != "cuda" else BODY.replace("thread_position_in_grid.x",
                                                           "(blockIdx.x * blockDim.x + threadIdx.x)")
    kernel = make(name=name, input_names=["x"], output_names=["y"], source=source, header=header)

    def step(x):
        return kernel(inputs=[x], template=[("T", x.dtype)], grid=(SIZE, 1, 1), threadgroup=(256, 1, 1),
                      output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

    return step


def kinds() -> dict:
    prelude = CUDA_PRELUDE if backend() == "cuda" else METAL_PRELUDE
    padding = PADDING * (PADDED_BYTES // len(PADDING))
    return {
        "built-in x * c": lambda x: x * 1.0001,
        "custom, one-line source": custom("", "launch_cost_bare"),
        "custom, our prelude": custom(prelude, "launch_cost_prelude"),
        f"custom, prelude + {PADDED_BYTES // 1000} KB comment": custom(prelude + padding, "launch_cost_padded"),
    }


def chain(step, x):
    for _ in range(CHAIN):
        x = step(x)
    return x


def measure(step) -> dict:
    x = mx.zeros((SIZE,), mx.bfloat16)
    mx.eval(chain(step, x))  # builds and caches the kernel
    best = {"build": float("inf"), "encode": float("inf"), "run": float("inf")}
    for _ in range(REPEATS):
        start = time.perf_counter()
        y = chain(step, x)
        built = time.perf_counter()
        mx.async_eval(y)
        encoded = time.perf_counter()
        mx.eval(y)
        best["build"] = min(best["build"], built - start)
        best["encode"] = min(best["encode"], encoded - built)
        y = chain(step, x)
        start = time.perf_counter()
        mx.eval(y)
        best["run"] = min(best["run"], time.perf_counter() - start)
    return {key: seconds / CHAIN * 1e6 for key, seconds in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("launch_cost needs a GPU backend (Metal or CUDA)")
    results = {name: measure(step) for name, step in kinds().items()}
    print(f"µs per launch, chains of {CHAIN}, best of {REPEATS}")
    print(f"{'kind':<36} {'build':>8} {'encode':>8} {'run':>8}")
    for name, row in results.items():
        print(f"{name:<36} {row['build']:8.2f} {row['encode']:8.2f} {row['run']:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(), "mlx": mx.__version__, "chain": CHAIN, "repeats": REPEATS, "us_per_launch": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
