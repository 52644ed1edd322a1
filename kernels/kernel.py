"""A kernel body built for the GPU at hand, and the choice between it and the pure-MLX reference.

`backend()` picks Metal on an Apple GPU, CUDA on an NVIDIA GPU (MLX's CUDA build), else the reference;
`MLX_GEMMA4_KERNELS=reference|metal|cuda|auto` overrides it (tests). The first use of each kernel
configuration runs a small probe against the reference (`usable`); one that fails to build or to
match falls back to the reference with a single `KernelFallbackWarning`, so a user never gets a crash
from a kernel this project could not run on their device.
"""

import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

from .prelude import CUDA_PRELUDE, METAL_PRELUDE

ENV = "MLX_GEMMA4_KERNELS"
BACKENDS = ("reference", "metal", "cuda")


class KernelFallbackWarning(UserWarning):
    """A kernel failed to build or to match its reference here; the reference is used instead."""


@lru_cache(maxsize=None)
def _device_backend() -> str:
    """The GPU kind of this process; asked once, since attention calls this on every layer and step."""
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "reference"


def backend() -> str:
    choice = os.environ.get(ENV, "auto")
    if choice == "auto":
        return _device_backend()
    if choice not in BACKENDS:
        raise ValueError(f"{ENV}={choice!r}: choose one of {', '.join(BACKENDS)} or auto")
    return choice


@dataclass
class Kernel:
    """One body in portable Metal spelling (see prelude.py) with its argument names.

    `row_contiguous=False` hands inputs to the body as they are (views included), to be indexed through
    `<name>_strides`; otherwise MLX copies any input that is not row-contiguous.
    """

    name: str
    source: str
    inputs: list
    outputs: list
    row_contiguous: bool = True
    _built: dict = field(default_factory=dict, repr=False)

    def build(self, backend: str):
        """The `mx.fast` kernel object for `backend` ("metal" or "cuda"), made once."""
        if backend not in self._built:
            make = {"metal": mx.fast.metal_kernel, "cuda": mx.fast.cuda_kernel}[backend]
            self._built[backend] = make(
                name=self.name,
                input_names=self.inputs,
                output_names=self.outputs,
                source=compact(self.source),
                header=compact(METAL_PRELUDE if backend == "metal" else CUDA_PRELUDE),
                ensure_row_contiguous=self.row_contiguous,
            )
        return self._built[backend]


def compact(source: str) -> str:
    """The source without `//` comments, indentation and blank lines. MLX rebuilds a custom kernel's whole
    source on every call and hashes it on every launch: on CUDA each KB costs ~0.3 µs of host time a launch
    (benchmarks/results/launch_cost.md), and a decode step makes hundreds."""
    lines = (line.split("//", 1)[0].strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


# A launcher runs one kernel call: launcher(kernel, inputs=..., template=..., grid=..., ...) -> outputs.
# On a GPU it is the backend's mx.fast kernel; the tests pass the CPU emulator instead.
Launcher = Callable[..., list]


def launcher(backend: str) -> Launcher:
    return lambda kernel, **call: kernel.build(backend)(**call)


_verdicts: dict = {}


def usable(key: tuple, probe: Callable[[], Optional[str]]) -> bool:
    """Whether the kernel configuration `key` works on this device.

    `probe()` runs once per configuration and process: it builds and runs the kernel on a small input
    and returns None when the result matches the reference, else what went wrong. It evaluates arrays,
    so the first call of a configuration must not happen inside `mx.compile`.
    """
    if key not in _verdicts:
        try:
            problem = probe()
        except Exception as error:  # a kernel that does not compile surfaces here, at evaluation
            problem = f"{type(error).__name__}: {error}"
        if problem:
            warnings.warn(f"kernel {key} unusable here ({problem}); using the reference", KernelFallbackWarning)
        _verdicts[key] = problem is None
    return _verdicts[key]
