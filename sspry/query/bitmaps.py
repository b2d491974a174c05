"""Packed document bitmaps: what a search evaluates and returns.

A segment's documents 0..docs-1 are bits of uint64 words, 64 documents per word: document d is bit
d % 64 of word d // 64. On a little-endian machine the words' bytes are then numpy's
`packbits(..., bitorder="little")` layout (document d is bit d % 8 of byte d // 8), which is how the
gather writes them and how the bit-sliced class matrices hold their documents. Bits past `docs` in the
last word are zero in every bitmap a search returns.
"""

from __future__ import annotations

import sys

import numpy as np

assert sys.byteorder == "little", "packed bitmaps view uint64 words as bytes"


def words(docs: int) -> int:
    """uint64 words holding `docs` bits."""
    return (docs + 63) // 64


def empty(rows: int, docs: int) -> np.ndarray:
    """A zeroed rows x words(docs) matrix of bitmaps."""
    return np.zeros((rows, words(docs)), dtype=np.uint64)


def pack(flags: np.ndarray) -> np.ndarray:
    """The bitmap of a boolean vector (one bit per element)."""
    flags = np.asarray(flags, dtype=bool)
    out = np.zeros(words(len(flags)), dtype=np.uint64)
    packed = np.packbits(flags, bitorder="little")
    out.view(np.uint8)[: len(packed)] = packed
    return out


def unpack(bitmap: np.ndarray, docs: int) -> np.ndarray:
    """The boolean vector of the first `docs` bits of a bitmap."""
    return np.unpackbits(bitmap.view(np.uint8), count=docs, bitorder="little").view(bool)


def documents(bitmap: np.ndarray, docs: int) -> np.ndarray:
    """Indices of the set bits of a bitmap (among the first `docs`), ascending."""
    return np.flatnonzero(unpack(bitmap, docs))


def count(bitmap: np.ndarray) -> int:
    """Set bits of a bitmap."""
    return int(np.bitwise_count(bitmap).sum())
