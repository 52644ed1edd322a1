"""Packed code layouts: b-bit codes of d coordinates in uint32 words, no code straddling a word.

- 4 bits: word w holds codes 8w..8w+7 (code i of the word at bits 4i).
- 2 bits: word w holds codes 16w..16w+15 (bits 2i).
- 3 bits: two planes, so that no code spans a word: d/16 words of the low two bits (as 2-bit),
  then d/32 words of the high bit (word w holds bit 2 of codes 32w..32w+31 at bit i).
Coordinates a SIMD lane owns (d/32 consecutive ones) thus sit in consecutive bits: coalesced loads.
"""

import mlx.core as mx

BITS = (2, 3, 4)


def words(dim: int, bits: int) -> int:
    """uint32 words of one packed vector."""
    if bits not in BITS:
        raise ValueError(f"TurboQuant packs 2, 3 or 4 bits a coordinate, not {bits}")
    if dim % 32:
        raise ValueError(f"packed head dims must be multiples of 32, got {dim}")
    return {2: dim // 16, 3: dim // 16 + dim // 32, 4: dim // 8}[bits]


def _pack_plane(codes: mx.array, width: int) -> mx.array:
    per_word = 32 // width
    grouped = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, per_word)
    shifts = mx.arange(per_word, dtype=mx.uint32) * width
    return mx.sum(grouped << shifts, axis=-1).astype(mx.uint32)  # disjoint bits: the sum is an or


def _unpack_plane(packed: mx.array, width: int) -> mx.array:
    per_word = 32 // width
    shifts = mx.arange(per_word, dtype=mx.uint32) * width
    codes = (packed[..., None] >> shifts) & ((1 << width) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def pack(codes: mx.array, bits: int) -> mx.array:
    """[..., d] codes in [0, 2**bits) -> [..., words(d, bits)] uint32."""
    words(codes.shape[-1], bits)
    if bits == 3:
        return mx.concatenate([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], axis=-1)
    return _pack_plane(codes, bits)


def unpack(packed: mx.array, bits: int, dim: int) -> mx.array:
    """[..., words(dim, bits)] uint32 -> [..., dim] uint32 codes."""
    if bits == 3:
        low, high = packed[..., : dim // 16], packed[..., dim // 16 :]
        return _unpack_plane(low, 2) | (_unpack_plane(high, 1) << 2)
    return _unpack_plane(packed, bits)
