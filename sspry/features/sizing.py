"""Bloom geometry shared by the index side and the query side.

A gram's identity is MurmurHash3 x64_128 of its bytes (seed 0), split into two 64-bit halves (h1, h2):
  * h1 feeds the HyperLogLog estimator (register = low 14 bits, rank from the rest: HLL++ as datasketch does);
  * h2 places the gram in a *blocked* bloom of m bits (m a multiple of 512): block = high 32 bits of h2
    scaled to the block count, and probe i sets bit (a + i*b) mod 512 of that block, with a and b taken
    from the low bits of h2 (b odd so the k probes differ).
Bloom sizes come from the estimate and the tier's fp, rounded up to a ladder of size classes
(`ladder_steps` sizes per doubling), so documents of one class share bit positions and can be stored
bit-sliced.
"""

from __future__ import annotations

import math
from functools import cache

import mmh3
import numpy as np

from sspry.policy import BLOCK_BITS, Policy, bits_per_gram

HLL_PRECISION = 14
MAX_BLOCKS = 1 << 32


@cache
def ladder(steps: int) -> np.ndarray:
    """All size classes, in 512-bit blocks, ascending: ceil(2**(s/steps)) for s = 0, 1, 2, ..."""
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
    return nblocks in _class_set(steps)


def bloom_blocks(estimate: float, policy: Policy, tier: int) -> int:
    """Bloom size in blocks for a document with `estimate` distinct grams in `tier`."""
    return class_blocks(estimate * bits_per_gram(policy.tier_fp(tier)), policy.ladder_steps)


def gram_hashes(grams: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(h1, h2) for each gram, with mmh3 as the reference implementation of the hash."""
    h1 = np.empty(len(grams), dtype=np.uint64)
    h2 = np.empty(len(grams), dtype=np.uint64)
    for i, gram in enumerate(grams):
        h1[i], h2[i] = mmh3.hash64(gram, seed=0, x64arch=True, signed=False)
    return h1, h2


def bloom_positions(h2: np.ndarray, nblocks: int, k: int) -> np.ndarray:
    """Bit positions (shape len(h2) x k) of grams with hash halves `h2` in a bloom of `nblocks` blocks."""
    h2 = np.asarray(h2, dtype=np.uint64)
    block = ((h2 >> np.uint64(32)) * np.uint64(nblocks)) >> np.uint64(32)
    a = h2 & np.uint64(511)
    b = ((h2 >> np.uint64(9)) & np.uint64(511)) | np.uint64(1)
    probes = np.arange(k, dtype=np.uint64)
    offsets = (a[:, None] + probes[None, :] * b[:, None]) & np.uint64(511)
    return block[:, None] * np.uint64(BLOCK_BITS) + offsets
