"""The exact Metal source MLX generates for a kernel call, and the pieces the checker and emulator need.

MLX writes the source in every build (mlx/backend/common/metal_kernel.cpp). A build without Metal
refuses to run the kernel, except while tracing a function for export, where `verbose=True` prints the
source on C++'s stdout: that is what Apple's compiler would get, less MLX's utils.h (metal_stdlib,
bfloat16_t, ...), which MLX prepends when it builds the library on a Mac and the shims stand in for.
"""

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

_PRINTED = re.compile(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```", re.S)


def capture(kernel, **call) -> str:
    """The source of `kernel(**call)`, `kernel` an mx.fast.metal_kernel object (numpy inputs allowed)."""
    inputs = [mx.array(x) if isinstance(x, np.ndarray) else x for x in call.pop("inputs")]

    def traced(*arrays):
        return kernel(inputs=list(arrays), verbose=True, **call)

    with tempfile.TemporaryDirectory() as folder:
        printed = _stdout_of(lambda: mx.export_function(os.path.join(folder, "k.mlxfn"), traced, *inputs))
    sources = _PRINTED.findall(printed)
    if len(sources) != 1:
        raise RuntimeError(f"expected one generated source, MLX printed {len(sources)}:\n{printed[:2000]}")
    return sources[0]


def _stdout_of(run: Callable) -> str:
    """What `run` writes on file descriptor 1 (C++'s std::cout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            run()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode()


@dataclass
class Param:
    type: str  # as declared, e.g. "const device bfloat16_t*", "const constant int&"
    name: str
    buffer: Optional[int]  # the [[buffer(i)]] index, or None for a thread-position attribute


@dataclass
class Signature:
    function: str
    template_args: str  # "<bfloat16_t, 256, 1>" or ""
    params: list


_KERNEL = re.compile(r"\[\[kernel\]\] void (\w+)\((.*?)\) \{", re.S)
_PARAM = re.compile(r"^\s*(.*?)\s*\b(\w+)\s*\[\[(\w+)(?:\((\d+)\))?\]\]\s*$")
_INSTANCE = re.compile(r"decltype\((\w+)(<.*?>)?\)")


def signature(source: str) -> Signature:
    function, params = _KERNEL.search(source).groups()
    parsed = []
    for text in params.split(",\n"):
        kind, name, attribute, index = _PARAM.match(text).groups()
        parsed.append(Param(kind, name, int(index) if attribute == "buffer" else None))
    instance = _INSTANCE.search(source)
    return Signature(function, instance.group(2) or "", parsed)


_ATTRIBUTE = re.compile(r"\[\[\s*\w+(?:\([^)]*\))?\s*\]\]\s*")
_THREADGROUP_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)*);")


def rewrite(source: str, threadgroup_decl: Callable[[int, str, str, str], str]) -> str:
    """`source` without [[...]] attributes, each `threadgroup T x[N];` replaced by
    threadgroup_decl(index, T, x, "[N]") (index counts the declarations in order)."""
    source = _ATTRIBUTE.sub("", source)
    counter = iter(range(1 << 30))
    return _THREADGROUP_DECL.sub(
        lambda m: threadgroup_decl(next(counter), m.group(1), m.group(2), re.sub(r"\s+", "", m.group(3))), source
    )
