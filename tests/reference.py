"""Slow, obviously-correct reference implementations (plain-Python gram hash, datasketch, bitarray) of
what the compiled kernels compute, so tests can hold the fast path to them."""

from __future__ import annotations

import hashlib
import math

import numpy as np
from bitarray import bitarray
from datasketch.hyperloglog import HyperLogLogPlusPlus

from sspry.bloom import bloom_positions, gram_hash_bytes
from sspry.features.sizing import HLL_PRECISION, bloom_blocks
from sspry.policy import BLOCK_BITS, Policy


def grams(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(len(data) - n + 1)]


def lower(gram: bytes) -> bytes:
    return bytes(b | 0x20 if 0x41 <= b <= 0x5A else b for b in gram)


def indexed_grams(data: bytes, n: int, fold: bool) -> list[bytes]:
    """What goes into a bloom: every gram, and with case folding every gram's lowercase form."""
    raw = grams(data, n)
    return raw + [lower(g) for g in raw] if fold else raw


def hll_registers(data: bytes, n: int, fold: bool = False) -> np.ndarray:
    hll = HyperLogLogPlusPlus(p=HLL_PRECISION, hashfunc=gram_hash_bytes)
    for gram in indexed_grams(data, n, fold):
        hll.update(gram)
    return hll.reg


def bloom(data: bytes, n: int, k: int, nblocks: int, fold: bool = False) -> bytes:
    bits = bitarray(nblocks * BLOCK_BITS, endian="little")
    bits.setall(0)
    grams = sorted(set(indexed_grams(data, n, fold)))
    h2 = np.array([gram_hash_bytes(g) for g in grams], dtype=np.uint64)
    for position in bloom_positions(h2, nblocks, k).ravel().tolist():
        bits[position] = 1
    return bits.tobytes()


def document_fields(data: bytes, policy: Policy, exact_min_bytes: int) -> dict:
    """Every field extract_file must produce for `data`, computed the slow way."""
    fields: dict = {"source_id": hashlib.new(policy.id_source, data).digest(), "filesize": len(data)}
    for tier, n in zip((1, 2), policy.gram_sizes, strict=True):
        fold = policy.fold_case and tier == 1
        if n == 3 and len(data) >= exact_min_bytes:
            estimate = len(set(indexed_grams(data, n, fold)))  # 3-grams of big files are counted exactly
        else:
            reg = hll_registers(data, n, fold)
            estimate = round(HyperLogLogPlusPlus(p=HLL_PRECISION, reg=reg).count())
        blocks = bloom_blocks(estimate, policy, tier)
        fields[f"tier{tier}_estimate"] = estimate
        fields[f"tier{tier}"] = bloom(data, n, policy.tier_k(tier), blocks, fold)
    counts = [data.count(bytes([b])) for b in range(256)]
    fields["entropy"] = -sum(c / len(data) * math.log2(c / len(data)) for c in counts if c) if data else 0.0
    fields["prefix"] = data[: policy.prefix_bytes]
    return fields
