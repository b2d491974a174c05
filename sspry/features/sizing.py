"""Bloom sizing: a document's distinct-gram estimate and its tier's fp give its bloom's size class.

A gram's hash (sspry/bloom.py's gram_hash) feeds the HyperLogLog estimator (register = low 14 bits,
rank from the rest: HLL++ as datasketch does) and places it in the bloom (the geometry, ladder and
probes, is sspry/bloom.py).
"""

from __future__ import annotations

import numpy as np

from sspry.bloom import class_blocks, gram_hash_array
from sspry.policy import Policy, bits_per_gram

HLL_PRECISION = 14


def bloom_blocks(estimate: float, policy: Policy, tier: int) -> int:
    """Bloom size in blocks for a document with `estimate` distinct grams in `tier`."""
    return class_blocks(estimate * bits_per_gram(policy.tier_fp(tier)), policy.ladder_steps)


def gram_hashes(grams: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(h1, h2) for each gram as the query side uses them: both are the one gram hash now (h1 was
    MurmurHash3's first half, the estimator's, in policy format 1); the pair is kept for callers."""
    h = gram_hash_array(grams)
    return h, h
