"""Rung (a) of the verification ladder: type-check the exact Metal source MLX generates, and lint it.

No Metal compiler runs on Linux. clang's "C++ for OpenCL 2021" mode with metal_check.h comes closest:
it checks the whole kernel, template instantiated with the real arguments, with Metal's address spaces
enforced. `lint` flags what C++ for OpenCL accepts but the Metal Shading Language forbids.
"""

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from metal_source import rewrite

HERE = os.path.dirname(os.path.abspath(__file__))
CLANG = shutil.which("clang-19")  # .ci/run installs it
# The x86-64 target takes __bf16 (spir64 does not) and still checks OpenCL address spaces; disabling
# the generic address space needs pipes and device-side enqueue disabled too.
FLAGS = ["-x", "cl", "-cl-std=clc++2021", "--target=x86_64-unknown-linux-gnu", "-fsyntax-only",
         "-Xclang", "-cl-ext=-__opencl_c_generic_address_space,-__opencl_c_pipes,-__opencl_c_device_enqueue,+cl_khr_fp16",
         "-Wno-unknown-attributes", "-include", os.path.join(HERE, "metal_check.h")]


def check(source: str) -> str:
    """clang's errors for an MLX-generated Metal source; empty when it type-checks."""
    code = rewrite(
        source,
        lambda i, kind, name, dims: f"__local {kind} (&{name}){dims} = *(__local {kind} (*){dims})threadgroup_slot({i});",
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.metal")
        with open(path, "w") as f:
            f.write(code)
        done = subprocess.run([CLANG, *FLAGS, path], capture_output=True, text=True)
    return done.stderr.replace(path, "kernel.metal") if done.returncode else ""


# The Metal Shading Language's restrictions on C++ that C++ for OpenCL does not share.
_FORBIDDEN = [
    (r"\[[^\[\]]*\]\s*\([^()]*\)\s*(mutable\s*)?(->\s*[\w:<> ]+\s*)?\{", "lambda expression"),
    (r"\bdouble\b", "double (no 64-bit floats on Apple GPUs)"),
    (r"\b(goto|thread_local|virtual|try|catch|throw|dynamic_cast|typeid|new|delete)\b", "C++ feature MSL lacks"),
    (r"\bstd::", "std:: (MSL's library is metal::)"),
    (r"\bprintf\s*\(", "printf"),
]


def lint(source: str) -> list:
    """'line N: problem: text' for each forbidden construct, comments ignored."""
    problems = []
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("//")[0]
        problems += [f"line {number}: {why}: {line.strip()}" for pattern, why in _FORBIDDEN if re.search(pattern, code)]
    return problems


def problems(sources) -> str:
    """Every clang error and lint finding of `sources` (type-checked in parallel), as one text: empty
    when all are clean."""
    sources = sorted(set(sources))
    with ThreadPoolExecutor() as pool:
        found = [error for error in pool.map(check, sources) if error]
    found += [problem for source in sources for problem in lint(source)]
    return "\n".join(found)[:4000]
