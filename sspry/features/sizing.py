"""Bloom sizing: a document's distinct-gram estimate and its tier's fp give its bloom's size class.

A gram's hash half h1 feeds the HyperLogLog estimator (register = low 14 bits, rank from the rest:
HLL++ as datasketch does); h2 places it in the bloom (the geometry, ladder and probes, is sspry/bloom.py).
"""

from __future__ import annotations

import mmh3
import numpy as np

from sspry.bloom import class_blocks
from sspry.policy import Policy, bits_per_gram

HLL_PRECISION = 14


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
