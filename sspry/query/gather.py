"""Reading gram leaves out of a segment's bit-sliced class matrices in one compiled call per tier.

For every class of the tier (skipping classes the caller marks unwanted) and every gram, the k probe
rows are ANDed byte by byte over the sliced part (one bit per document), then bit by bit over the
tail documents, and the documents whose bits survive are marked in `out[gram, document]`. The work is
(grams x k x documents / 8) bytes, whatever the number of classes: numpy did the same per class and
paid its call overhead (grams x classes) times.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from sspry.store.segment import SegmentReader


@njit(nogil=True, cache=True)
def gather_leaves(blooms, offsets, blocks, counts, starts, members, wanted, h2, k, out):
    for c in range(offsets.shape[0]):
        if not wanted[c]:
            continue
        nblocks = np.uint64(blocks[c])
        count = counts[c]
        q = count // 8
        rest = count - 8 * q
        nbits = blocks[c] * 512
        tail = offsets[c] + nbits * q
        row_bytes = nbits // 8
        start = starts[c]
        for g in range(h2.shape[0]):
            h = h2[g]
            base = (((h >> np.uint64(32)) * nblocks) >> np.uint64(32)) << np.uint64(9)
            a = h & np.uint64(511)
            b = ((h >> np.uint64(9)) & np.uint64(511)) | np.uint64(1)
            for j in range(q):
                value = np.uint8(0xFF)
                for probe in range(k):
                    position = np.int64(base + ((a + np.uint64(probe) * b) & np.uint64(511)))
                    value &= blooms[offsets[c] + position * q + j]
                    if value == 0:
                        break
                if value:  # branch-free: a Tier 1 gram is in about 40% of blooms, bits are coin flips
                    first = start + 8 * j
                    for bit in range(8):
                        out[g, members[first + bit]] = (value >> np.uint8(bit)) & np.uint8(1)
            for t in range(rest):
                present = True
                for probe in range(k):
                    position = np.int64(base + ((a + np.uint64(probe) * b) & np.uint64(511)))
                    if not (blooms[tail + t * row_bytes + (position >> 3)] >> (position & 7)) & 1:
                        present = False
                        break
                if present:
                    out[g, members[start + 8 * q + t]] = 1


def read_leaves(
    reader: SegmentReader, tier: int, h2: np.ndarray, k: int, documents: np.ndarray | None
) -> np.ndarray:
    """bool (grams x documents): gram g may be in document d's bloom. Only classes holding one of
    `documents` (a boolean mask; None: all) are read; the others read False."""
    out = np.zeros((len(h2), reader.docs), dtype=np.uint8)
    if len(h2) and reader.docs:
        arrays = reader.class_arrays(tier)
        gather_leaves(
            reader.blooms,
            arrays.offsets,
            arrays.blocks,
            arrays.counts,
            arrays.starts,
            arrays.members,
            arrays.holding(documents),
            np.ascontiguousarray(h2, dtype=np.uint64),
            k,
            out,
        )
    return out.view(bool)
