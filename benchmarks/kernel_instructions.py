"""PTX instructions per key of the decode-attention partial passes, counted offline (no GPU needed).

    python -m benchmarks.kernel_instructions --out /tmp/ptx

For each configuration (the 31B layers: global D=512 G=8, sliding D=256 G=2; bf16 queries) this
records the partial pass's launch as our `attend` makes it, writes the CUDA source MLX's
`mx.fast.cuda_kernel` would build for it (the CUDA prelude, then a `__global__` wrapper with each input's
pointer, `_shape`/`_strides` where the body names them and the template as constants, as MLX's
custom_kernel.cpp writes them), compiles it with nvcc -ptx for sm_90 and counts the PTX instructions of
the loop over keys (the loop that holds the shuffles of the per-key reductions), `mov`s left out (register
moves, which ptxas mostly removes). Per key and kv head:
loop instructions / BK keys × the simdgroups that read each key (G / HPS). ptxas -v adds the registers
and spills. These are static PTX counts, a proxy for the per-key work: not SASS, not timings.
Writes <name>.cu, <name>.ptx and instructions.md under --out.
"""

import argparse
import importlib
import re
import subprocess
from collections import Counter
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import tq_attention
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE
from mlx_gemma4.turboquant.codec import TurboQuantCodec

# the module, not the function the package exports under its name
decode_attention = importlib.import_module("mlx_gemma4.kernels.decode_attention")
NVCC = "/usr/local/cuda/bin/nvcc"
ARCH = "sm_90"
CONFIGS = {  # name: (kernel, head dim, query heads per kv head, key bits, value bits); 0 bits: the bf16 cache
    "31B global bf16": ("bf16", 512, 8, 0, 0),
    "31B global TQ 4/4": ("tq", 512, 8, 4, 4),
    "31B sliding bf16": ("bf16", 256, 2, 0, 0),
    "31B sliding TQ 4/4": ("tq", 256, 2, 4, 4),
    "E2B sliding TQ 4/4": ("tq", 256, 8, 4, 4),
    "E2B sliding TQ 3/2": ("tq", 256, 8, 3, 2),
}
CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t",
              mx.int32: "int32_t", mx.bool_: "bool"}
# MLX's device header: Shape and Strides are cuda::std::array<int32_t | int64_t, MAX_NDIM = 10>
HEADER = r"""#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
template <typename I> struct Array10 {
  I v[10];
  __device__ const I& operator[](int i) const { return v[i]; }
};
typedef Array10<int32_t> Shape;
typedef Array10<int64_t> Strides;
"""


def partial_launch(kind: str, dim: int, group: int, k_bits: int, v_bits: int) -> dict:
    """The partial pass's launch (kernel, inputs, template, ...) as `attend` makes it, for 1000 keys."""
    calls = []

    def record(kernel, **call):
        calls.append(dict(kernel=kernel, **call))
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    q = mx.zeros((1, group, 1, dim), mx.bfloat16)
    if kind == "bf16":
        keys = mx.zeros((1, 1, 1000, dim), mx.bfloat16)
        decode_attention.attend(record, q, keys, keys, 1.0, mx.ones((1, 1000), mx.bool_))
    else:
        k_codec, v_codec = TurboQuantCodec(dim, k_bits, 0), TurboQuantCodec(dim, v_bits, 1)
        k_rows = mx.zeros((1, 1, 1000, k_codec.words + 1), mx.uint32)
        v_rows = mx.zeros((1, 1, 1000, v_codec.words + 1), mx.uint32)
        tq_attention.attend(record, q, k_rows, v_rows, k_codec, v_codec, 1.0, mx.ones((1, 1000), mx.bool_))
    return calls[0]


def cuda_source(launch: dict) -> str:
    """The translation unit MLX's CUDA backend compiles for this launch (its device header stood in)."""
    kernel = launch["kernel"]
    params = []
    for name, array in zip(kernel.inputs, launch["inputs"]):
        params.append(f"const {CUDA_TYPES[array.dtype]}* {name}")
        params += [f"const __grid_constant__ {kind} {name}_{suffix}" for kind, suffix in
                   (("Shape", "shape"), ("Strides", "strides")) if f"{name}_{suffix}" in kernel.source]
    params += [f"{CUDA_TYPES[dtype]}* {name}" for name, dtype in zip(kernel.outputs, launch["output_dtypes"])]
    constants = []
    for name, value in launch["template"]:
        if isinstance(value, bool):
            constants.append(f"  constexpr bool {name} = {str(value).lower()};")
        elif isinstance(value, int):
            constants.append(f"  constexpr int {name} = {value};")
        else:
            constants.append(f"  using {name} = {CUDA_TYPES[value]};")
    return (HEADER + CUDA_PRELUDE + "namespace mlx::core::cu {\n__global__ void " + kernel.name + "(\n    "
            + ",\n    ".join(params) + ") {\n" + "\n".join(constants) + "\n" + kernel.source + "\n}\n}\n")


def compile_ptx(source: str, path: Path) -> tuple:
    """(PTX text, ptxas's resource line) of the source written at path.cu."""
    path.with_suffix(".cu").write_text(source)
    flags = [NVCC, f"-arch={ARCH}", "-std=c++17", str(path.with_suffix(".cu"))]
    subprocess.run(flags + ["-ptx", "-o", str(path.with_suffix(".ptx"))], check=True)
    built = subprocess.run(flags + ["-cubin", "-Xptxas", "-v", "-o", "/dev/null"], check=True, capture_output=True,
                           text=True)
    usage = " ".join(line.split(":", 1)[-1].strip() for line in built.stderr.splitlines()
                     if "Used" in line or "spill" in line)
    return path.with_suffix(".ptx").read_text(), usage


def key_loop(ptx: str) -> list:
    """The opcodes of the loop over keys: the innermost backward branch around every shfl.sync."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:$", line)}
    shuffles = [i for i, line in enumerate(lines) if line.startswith("shfl.sync")]
    loops = []  # (start, end) of each backward branch's region
    for i, line in enumerate(lines):
        target = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if target and labels[target.group(1)] < i:
            loops.append((labels[target.group(1)], i))
    around = [(a, b) for a, b in loops if a < shuffles[0] and shuffles[-1] < b]
    if not around:
        raise RuntimeError("no loop around the shuffles: is the key loop unrolled or gone?")
    start, end = min(around, key=lambda r: r[1] - r[0])
    inner = [(a, b) for a, b in loops if start < a and b < end]
    if inner:
        raise RuntimeError(f"{len(inner)} loop(s) inside the key loop: static counts would undercount")
    body = [line for line in lines[start:end + 1] if line and not line.endswith(":") and not line.startswith("//")]
    opcodes = [re.sub(r"^@!?%p\d+\s+", "", line).split()[0].rstrip(";") for line in body]
    return [op for op in opcodes if not op.startswith("mov.")]  # register moves: ptxas mostly removes them


KINDS = {  # opcode prefix: the column it counts in
    "fma": "fma", "mul": "mul/add", "add": "mul/add", "sub": "mul/add", "shfl": "shfl",
    "ld.shared": "ld.shared", "ld.global": "ld.global", "shr": "shift/and", "shl": "shift/and",
    "and": "shift/and", "bfe": "shift/and", "ex2": "exp",
}


def kind(opcode: str) -> str:
    for prefix, column in KINDS.items():
        if opcode.startswith(prefix):
            return column
    return "other"


def count(name: str, out: Path) -> dict:
    kernel, dim, group, k_bits, v_bits = CONFIGS[name]
    launch = partial_launch(kernel, dim, group, k_bits, v_bits)
    template = dict(launch["template"])
    ptx, usage = compile_ptx(cuda_source(launch), out / re.sub(r"\W+", "_", name).strip("_"))
    opcodes = key_loop(ptx)
    readers = template["G"] // template["HPS"]  # simdgroups that read each key
    kinds = Counter(map(kind, opcodes))
    per_key = readers / template["BK"]
    return dict(name=name, hps=template["HPS"], bk=template["BK"], loop=len(opcodes),
                per_key=len(opcodes) * per_key, kinds={k: v * per_key for k, v in kinds.items()}, usage=usage)


def table(rows: list) -> str:
    columns = ["fma", "mul/add", "shift/and", "ld.shared", "ld.global", "shfl", "exp", "other"]
    lines = [
        f"PTX instructions of the partial pass's loop over keys (nvcc {ARCH}, bf16 queries, "
        "`python -m benchmarks.kernel_instructions`): static counts, not timings.",
        "",
        "| configuration | HPS | loop (BK keys, one simdgroup) | per key and kv head | "
        + " | ".join(columns) + " | ptxas |",
        "|---|---:|---:|---:|" + "---:|" * len(columns) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['kinds'].get(c, 0):.0f}" for c in columns)
        lines.append(f"| {r['name']} | {r['hps']} | {r['loop']} | {r['per_key']:.0f} | {cells} | {r['usage']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .cu, .ptx and instructions.md")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = table([count(name, args.out) for name in args.configs])
    (args.out / "instructions.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
