"""How the MoE kernels read a weight matrix: float, or affine-quantized as `mx.quantize` packs it.

A `Packed` weight is a stack of matrices [..., rows, n] (the experts' [E, out, in], or the router's
[E, H]) in one of two formats:
- float (float32, float16, bfloat16): `weight` as is;
- affine 4- or 8-bit (what the converter and mlx-lm write): `weight` uint32 [..., rows, n * bits / 32],
  value i of a row in bits `bits * (i % (32 / bits))` of word `i / (32 / bits)`; `scales`, `biases`
  [..., rows, n / group_size] in the model's float type; w = scale * q + bias.

`row_dot` writes the body code in which a kernel's lanes split rows into chunks and accumulate rows · x;
the kernel's `simd_sum` finishes the sums. A quantized chunk is 16 bytes, four uint32 words read by one
128-bit load (32 values at 4 bits, 16 at 8): NVIDIA GPUs need 16-byte loads per lane to stream weights near
bandwidth. A float chunk is four values.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .quantized_matmul import UNPACK_CODES

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
BITS = (4, 8)


@dataclass(frozen=True)
class Packed:
    weight: mx.array
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    bits: int = 0  # 0: float weights
    group_size: int = 0
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def n(self) -> int:
        """The row length (input dimension)."""
        return self.weight.shape[-1] * 32 // self.bits if self.quantized else self.weight.shape[-1]

    @property
    def values_per_chunk(self) -> int:
        return 128 // self.bits if self.quantized else 4

    @property
    def signature(self) -> tuple:
        """What a kernel plan depends on: the format and shape, not the values."""
        return (self.weight.shape, self.weight.dtype, self.bits, self.group_size, self.mode,
                None if self.scales is None else self.scales.dtype, self.biases is None)

    @property
    def arrays(self) -> list:
        return [self.weight, self.scales, self.biases] if self.quantized else [self.weight]

    def dense(self) -> mx.array:
        """The float matrices (the references' view of the weight)."""
        if not self.quantized:
            return self.weight
        return mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, mode=self.mode)

    def template(self) -> list:
        """BITS (0: float), GS (group size), VPC (values a lane reads at once: four uint32 words, or 4 floats)."""
        return [("BITS", self.bits), ("GS", self.group_size or 4), ("VPC", self.values_per_chunk)]


def kernel_supports(w: Packed) -> bool:
    """Formats the kernels read; the model falls back to its reference for anything else."""
    if w.quantized:
        # n a multiple of the group, hence of a chunk: every row starts 16-byte aligned
        return (w.mode == "affine" and w.bits in BITS and w.biases is not None and w.group_size in (32, 64, 128)
                and w.n % w.group_size == 0 and w.weight.dtype == mx.uint32 and w.scales.dtype in FLOAT_DTYPES)
    return w.weight.dtype in FLOAT_DTYPES and w.n % 4 == 0


def names(prefix: str, quantized: bool) -> list:
    """The kernel input names of a weight."""
    return [prefix, f"{prefix}_scales", f"{prefix}_biases"] if quantized else [prefix]


def row_dot(quantized: bool, w: str, rows: list, chunk: str, x_chunk: str, acc: list, factor: str = "") -> str:
    """Body code: acc[i] += factor * (row rows[i] of `w`, chunk `chunk`) · (x's same chunk), for each i.

    `rows` are C expressions of flat row indices, `x_chunk` a format string giving an f32x4 of x from
    its element offset {}; template constants: N (row length), BITS, GS, VPC. Every row's chunk is loaded
    before any arithmetic, so that all of a lane's loads are in flight at once. A quantized chunk lies
    inside one group (GS is a multiple of the 32 or 16 values it holds), so it folds
    Σ (s q + b) x = s Σ q x + b Σ x, with x's chunk sum shared by all rows. Codes become floats as the
    quantized GEMV's do, two per float16 pair (quantized_matmul.UNPACK_CODES, defined here too).
    """
    scale = f"{factor} * " if factor else ""
    if not quantized:
        lines = [f"f32x4 xv = {x_chunk.format(f'4 * ({chunk})')};"]
        for row, a in zip(rows, acc):
            lines.append(f"{{ f32x4 wv = load4({w} + size_t({row}) * N + 4 * ({chunk}));")
            lines.append(f"  {a} += {scale}(wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w); }}")
        return "\n".join(lines)
    count = len(rows)
    lines = UNPACK_CODES.strip().splitlines() + [
        f"const int group = VPC * ({chunk}) / GS;",
        f"uint q[{count}][4];",
        f"float s[{count}];",
        f"float b[{count}];",
    ]
    for i, row in enumerate(rows):
        lines += [
            "{",
            f"  const size_t r = size_t({row});",
            f"  const u32x4 words = load_words4({w} + r * (N * BITS / 32) + 4 * ({chunk}));",
            f"  for (int i = 0; i < 4; i++) {{",
            f"    q[{i}][i] = words.v[i];",
            "  }",
            f"  s[{i}] = static_cast<float>({w}_scales[r * (N / GS) + group]);",
            f"  b[{i}] = static_cast<float>({w}_biases[r * (N / GS) + group]);",
            "}",
        ]
    lines += [
        "float xv[VPC];",
        "float xsum = 0.0f;",
        "for (int v = 0; v < VPC; v += 4) {",
        f"  const f32x4 four = {x_chunk.format(f'VPC * ({chunk}) + v')};",
        "  xv[v] = four.x;",
        "  xv[v + 1] = four.y;",
        "  xv[v + 2] = four.z;",
        "  xv[v + 3] = four.w;",
        "  xsum += four.x + four.y + four.z + four.w;",
        "}",
    ]
    for i, a in enumerate(acc):
        lines += [
            "{",
            "  float qx = 0.0f;",
            "#pragma unroll",
            "  for (int j = 0; j < 4; j++) {",
            f"    const uint word = q[{i}][j];",
            "    UNPACK_CODES",
            "#pragma unroll",
            "    for (int v = 0; v < 32 / BITS; v++) {",
            "      qx += code[v] * xv[j * (32 / BITS) + v];",
            "    }",
            "  }",
            f"  {a} += {scale}(s[{i}] * qx + b[{i}] * xsum);",
            "}",
        ]
    return "\n".join(lines)
