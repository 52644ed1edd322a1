"""TurboQuant_mse codec of one layer's keys or values: rotate, one norm per vector, Lloyd-Max codes.

A vector x [D] becomes one uint32 row (kernels/tq_encode.py, one kernel call): the packed codes of
R·x/‖x‖ and the float32 bits of its norm, corrected to ‖x‖/‖c[codes]‖ so that the dequantized vector
has exactly the norm of x. The correction costs nothing at decode and removes the Lloyd-Max shrink (E‖c‖ < 1) that
scales every score down: on the bundled model it halves TQ 4/4's next-token KL
(benchmarks/results/kv_quant_quality_bundled.md). Attention never returns to the original basis per token: scores are
⟨R_k·q, ‖k‖·c[codes]⟩ and values are summed as ‖v‖·c[codes] in the rotated basis, then rotated back
once (R_vᵀ). No QJL residual: every production port found it hurts attention (research §3.3).
"""

import math

import mlx.core as mx

from ..kernels.tq_encode import encode
from .codebook import lloyd_max
from .packing import unpack, words
from .rotation import rotate, signs, unrotate


class TurboQuantCodec:
    def __init__(self, dim: int, bits: int, seed: int):
        self.dim, self.bits, self.seed = dim, bits, seed
        self.words = words(dim, bits)  # also checks dim and bits
        if dim & (dim - 1):
            raise ValueError(f"TurboQuant needs a power-of-two head dim, got {dim}")
        centroids, boundaries, self.unit_mse = lloyd_max(dim, bits)
        self.centroids = mx.array(centroids, mx.float32)
        self.boundaries = mx.array(boundaries, mx.float32)
        self.sign = signs(seed, dim)

    def encode(self, x: mx.array) -> mx.array:
        """[..., D] -> packed rows [..., words + 1] uint32: codes, then the corrected norm."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of {self.dim} coordinates, got {x.shape[-1]}")
        return encode(x, self.sign, self.centroids, self.boundaries, self.bits)

    def norms(self, rows: mx.array) -> mx.array:
        return rows[..., self.words :].view(mx.float32)

    def decode_rotated(self, rows: mx.array) -> mx.array:
        """‖x‖·c[codes]: the approximation of R·x, float32 [..., D]."""
        codes = unpack(rows[..., : self.words], self.bits, self.dim)
        return self.centroids[codes] * self.norms(rows)

    def decode(self, rows: mx.array) -> mx.array:
        """The approximation of x, float32 [..., D]."""
        return unrotate(self.decode_rotated(rows), self.sign)

    def rotate(self, x: mx.array) -> mx.array:
        return rotate(x, self.sign)

    def unrotate(self, y: mx.array) -> mx.array:
        return unrotate(y, self.sign)

    @property
    def bytes_per_vector(self) -> int:
        return 4 * (self.words + 1)

    def __repr__(self):
        return f"TurboQuantCodec(dim={self.dim}, bits={self.bits}, seed={self.seed})"


def theoretical_bounds(bits: int) -> tuple:
    """The paper's bounds on E‖u - ũ‖² for a unit vector: 4^-b ≤ D ≤ (√3·π/2)·4^-b."""
    return 4.0**-bits, math.sqrt(3) * math.pi / 2 * 4.0**-bits
