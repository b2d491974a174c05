"""Reading gram leaves out of a segment's bit-sliced class matrices, compiled or with numpy.

For every class of the tier (skipping classes the caller marks unwanted) and every gram, the k probe
rows are ANDed byte by byte over the sliced part (one bit per document), then bit by bit over the tail
documents, and the documents whose bits survive are marked in `out[gram, document]`. Two ways, the same
result (tests/test_store.py holds them equal):

  * compiled (`kernels.gather_leaves`): one call per tier; the work is (grams x k x documents / 8) bytes
    whatever the number of classes. Importing numba and loading the kernel costs 0.22 s per process;
  * numpy (`_gather_numpy`): the same class by class, paying numpy's call overhead per class. For a
    small search in a fresh process that costs less than loading numba, so it never imports it.

A search picks one for all its segments (`compiled_pays`; a long-lived server always compiles).
"""

from __future__ import annotations

import numpy as np

from sspry.features.sizing import bloom_positions
from sspry.store.segment import SegmentReader

# The choice, measured in fresh processes on forests of 100 to 12,000 documents and bundles of 1 to 1,000
# rules: numpy costs about 20 us per class read and 2 ns per gram x document more than the kernel (Tier 1
# less, Tier 2 more), and importing numba, setting it up and loading the cached kernel costs 0.22 s. So
# numpy wins while its extra cost stays under that. Whole commands: 300 rules over 4,000 documents take
# 1.06 s with numpy, 1.25 s compiled (chosen: numpy); over 8,000 documents 1.49 s and 1.32 s (compiled).
NUMPY_EXTRA_SECONDS_PER_CLASS = 20e-6
NUMPY_EXTRA_SECONDS_PER_CELL = 2e-9
COMPILED_LOAD_SECONDS = 0.22


def compiled_pays(classes: int, cells: int) -> bool:
    """Is a search that reads `classes` classes and `cells` grams x documents (summed over its segments
    and batches) worth loading the compiled kernel for, in a process that has not loaded it yet?"""
    extra = classes * NUMPY_EXTRA_SECONDS_PER_CLASS + cells * NUMPY_EXTRA_SECONDS_PER_CELL
    return extra > COMPILED_LOAD_SECONDS


def read_leaves(
    reader: SegmentReader,
    tier: int,
    h2: np.ndarray,
    k: int,
    documents: np.ndarray | None,
    compiled: bool = True,
) -> np.ndarray:
    """bool (grams x documents): gram g may be in document d's bloom. Only classes holding one of
    `documents` (a boolean mask; None: all) are read; the others read False."""
    out = np.zeros((len(h2), reader.docs), dtype=np.uint8)
    if len(h2) and reader.docs:
        arrays = reader.class_arrays(tier)
        wanted = arrays.holding(documents)
        h2 = np.ascontiguousarray(h2, dtype=np.uint64)
        if compiled:
            from sspry.features import kernels  # numba: see the module docstring

            kernels.gather_leaves(
                reader.blooms,
                arrays.offsets,
                arrays.blocks,
                arrays.counts,
                arrays.starts,
                arrays.members,
                wanted,
                h2,
                k,
                out,
            )
        else:
            _gather_numpy(reader, tier, wanted, h2, k, out)
    return out.view(bool)


def _gather_numpy(
    reader: SegmentReader, tier: int, wanted: np.ndarray, h2: np.ndarray, k: int, out: np.ndarray
) -> None:
    """`kernels.gather_leaves` with numpy, one class at a time."""
    for index in np.flatnonzero(wanted).tolist():
        span = reader.classes[tier][index]
        members = reader.class_members(tier, index)
        sliced, tail = reader.class_matrices(tier, index)
        positions = bloom_positions(h2, span.blocks, k).astype(np.intp)  # grams x k
        full = sliced.shape[1] * 8
        if full:
            # sliced[positions]: grams x k x q bytes; bit b of byte j is document 8j+b of the class
            present = np.bitwise_and.reduce(sliced[positions], axis=1)
            out[:, members[:full]] = np.unpackbits(present, axis=1, bitorder="little")
        if len(tail):
            bits = tail[:, positions >> 3] >> (positions & 7).astype(np.uint8)  # tail docs x grams x k
            out[:, members[full:]] = (bits & 1).all(axis=2).T
