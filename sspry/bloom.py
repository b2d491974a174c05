"""Bloom geometry: the size classes and where a gram's bits are, for the index side and the query side.

A gram's identity is one 64-bit hash `h` of its n bytes (n <= 8) packed little-endian into an integer:
`gram_hash` below, splitmix64's finaliser (two multiplies) of gram + n * 0x9E3779B97F4A7C15. The same h
feeds the size estimate (features/sizing.py: HyperLogLog register from its low 14 bits, rank from the
rest) and places the gram in a *blocked* bloom of `nblocks` blocks of BLOCK_BITS (512) bits (h2 below
is that same h; policy format 1 used MurmurHash3 x64_128's two halves, see docs/architecture.md):

  * block = the high BLOCK_HASH_BITS (32) bits of h2 scaled to the block count: (h2 >> 32) * nblocks >> 32;
  * probe i (i < k) sets bit (a + i*b) mod 512 of that block, a = h2 & 511 and b = ((h2 >> 9) & 511) | 1
    (odd, so the k probes differ).

One block is one cache line, so building a bloom costs one cache miss per gram, not k. Bloom sizes are
rounded up to a ladder of size classes (`steps` sizes per doubling), so documents of one class share
bit positions and can be stored bit-sliced (store/segment.py).

The probe functions below are plain Python on numpy uint64 scalars so that numba compiles them as they
are: features/kernels.py wraps them (`njit(inline="always")`) for the index kernels and the search
gather alike, and `bloom_positions` is their numpy reference (tests hold them equal). Nothing here
imports numba.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from sspry.policy import BLOCK_BITS

BLOCK_BYTES = BLOCK_BITS // 8
OFFSET_BITS = BLOCK_BITS.bit_length() - 1  # 9: a probe's offset inside its block takes this many bits
OFFSET_MASK = BLOCK_BITS - 1  # 511
BLOCK_HASH_BITS = 32  # the block index comes from the high 32 bits of h2
MAX_BLOCKS = 1 << BLOCK_HASH_BITS  # the scaling (h2 >> 32) * nblocks >> 32 must not overflow 64 bits

_HASH_SHIFT = np.uint64(64 - BLOCK_HASH_BITS)
_SCALE_SHIFT = np.uint64(BLOCK_HASH_BITS)
_OFFSET_BITS = np.uint64(OFFSET_BITS)
_OFFSET_MASK = np.uint64(OFFSET_MASK)
_BLOCK_BITS = np.uint64(BLOCK_BITS)
_ODD = np.uint64(1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_MASK64 = (1 << 64) - 1


# --- the gram hash (compiled by features/kernels.py; numpy uint64 scalars or arrays in, out) -------------
def gram_hash(gram, n):
    """The 64-bit hash of an n-byte gram packed little-endian in `gram` (both uint64): splitmix64's
    finaliser, a bijection of gram + n * golden, so grams of one size never collide in the hash."""
    z = gram + n * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def gram_hash_bytes(gram: bytes) -> int:
    """`gram_hash` in plain Python integers: the reference the kernels and the query side are held to."""
    z = (int.from_bytes(gram, "little") + len(gram) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def gram_hash_array(grams: list[bytes]) -> np.ndarray:
    """`gram_hash` of each gram (any sizes up to 8 bytes), vectorised with numpy: the query side's hash."""
    packed = np.array([int.from_bytes(g, "little") for g in grams], dtype=np.uint64)
    sizes = np.array([len(g) for g in grams], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return gram_hash(packed, sizes)


# --- size classes -------------------------------------------------------------------------------------
@cache
def ladder(steps: int) -> np.ndarray:
    """All size classes, in blocks, ascending: ceil(2**(s/steps)) for s = 0, 1, 2, ..."""
    values = {math.ceil(2.0 ** (s / steps)) for s in range(32 * steps + 1)}
    return np.array(sorted(v for v in values if v <= MAX_BLOCKS), dtype=np.uint64)


def class_blocks(needed_bits: float, steps: int) -> int:
    """The smallest ladder class (in blocks) holding at least `needed_bits` bits."""
    sizes = ladder(steps)
    want = max(1, math.ceil(needed_bits / BLOCK_BITS))
    index = int(np.searchsorted(sizes, want, side="left"))
    return int(sizes[min(index, len(sizes) - 1)])


@cache
def _class_set(steps: int) -> frozenset[int]:
    return frozenset(int(v) for v in ladder(steps))


def is_class(nblocks: int, steps: int) -> bool:
    """Is a bloom of `nblocks` blocks one of the ladder's sizes?"""
    return nblocks in _class_set(steps)


# --- probe positions (compiled by features/kernels.py; numpy uint64 scalars in, out) --------------------
def gram_probes(h2, nblocks):
    """(first bit of the block, a, b) of a gram with hash half `h2` in a bloom of `nblocks` blocks (both
    uint64): its probe i is `probe_bit(base, a, b, i)`."""
    base = (((h2 >> _HASH_SHIFT) * nblocks) >> _SCALE_SHIFT) * _BLOCK_BITS
    a = h2 & _OFFSET_MASK
    b = ((h2 >> _OFFSET_BITS) & _OFFSET_MASK) | _ODD
    return base, a, b


def probe_bit(base, a, b, i):
    """Bit position of probe `i` (a uint64) of a gram whose `gram_probes` are (base, a, b)."""
    return base + ((a + i * b) & _OFFSET_MASK)


def bloom_positions(h2: np.ndarray, nblocks: int, k: int) -> np.ndarray:
    """The numpy reference of the functions above: bit positions (len(h2) x k, uint64) of grams with hash
    halves `h2` in a bloom of `nblocks` blocks."""
    h2 = np.asarray(h2, dtype=np.uint64)
    base = ((h2 >> _HASH_SHIFT) * np.uint64(nblocks)) >> _SCALE_SHIFT
    a = h2 & _OFFSET_MASK
    b = ((h2 >> _OFFSET_BITS) & _OFFSET_MASK) | _ODD
    probes = np.arange(k, dtype=np.uint64)
    offsets = (a[:, None] + probes[None, :] * b[:, None]) & _OFFSET_MASK
    return base[:, None] * _BLOCK_BITS + offsets
