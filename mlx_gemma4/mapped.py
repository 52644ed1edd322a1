"""An embedding table read through a memory map of its safetensors file.

E2B/E4B's per-layer embedding tables hold 2.35B / 2.82B parameters, yet each step needs one row per
token. Gathering those rows from a memory map keeps the table out of resident memory: only the
pages of the rows actually used are read.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# safetensors dtype -> (numpy storage dtype, mlx dtype). bf16 is carried as raw uint16 bits.
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
}


def tensor_location(file: Path, name: str) -> tuple[int, str, list]:
    """Byte offset, dtype and shape of tensor `name` inside a safetensors file."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    entry = header[name]
    return 8 + header_len + entry["data_offsets"][0], entry["dtype"], entry["shape"]


class MappedEmbedding(nn.Module):
    def __init__(self, file: Path, name: str):
        super().__init__()
        offset, dtype, shape = tensor_location(file, name)
        if dtype not in DTYPES:
            raise ValueError(f"{name} in {file} has dtype {dtype}; a mapped embedding needs one of {list(DTYPES)}")
        storage, self._mx_dtype = DTYPES[dtype]
        # A plain attribute (not an mx.array), so it is no parameter and never loaded whole.
        self._table = np.memmap(file, dtype=storage, mode="r", offset=offset, shape=tuple(shape))

    def __call__(self, ids: mx.array) -> mx.array:
        rows = mx.array(np.ascontiguousarray(self._table[np.array(ids, copy=False)]))
        return rows.view(self._mx_dtype) if self._mx_dtype == mx.bfloat16 else rows
