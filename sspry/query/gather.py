"""Reading gram rows out of a segment's bit-sliced class matrices into packed document bitmaps.

A gram's row is the bitmap (query/bitmaps.py: 64 documents a word, in document order) of the documents
whose bloom holds all k probe bits of the gram. A class matrix already holds 8 documents a byte in class
order, so for its first 8*q documents the k probe rows are ANDed byte by byte and the bytes land in the
gram's row: Tier 1 classes are contiguous document ranges (the bytes are copied, shifted by the class's
first document mod 8), Tier 2 classes reach their documents through `t2_order` (the set bits are
scattered, and only among the documents asked for). The last count mod 8 documents of a class are plain
blooms, tested bit by bit. Two ways, the same bits (tests hold them equal):

  * compiled (`kernels.gather_rows`): one call per tier; the work is (grams x k x documents / 8) bytes
    whatever the number of classes. Importing numba and loading the kernels costs 0.22 s per process;
  * numpy (`_gather_numpy`): the same class by class, paying numpy's call overhead per class. For a
    small search in a fresh process that costs less than loading numba, so it never imports it.

A search picks one for all its segments (`compiled_pays`; a long-lived server always compiles), and the
same choice runs the plan programs (query/program.py).
"""

from __future__ import annotations

import numpy as np

from sspry.bloom import bloom_positions
from sspry.query import bitmaps
from sspry.store.segment import SegmentReader

# The choice, measured in fresh processes (CPU seconds of whole `local search` commands) on forests of
# 3,300 and 10,000 documents in 8 segments and bundles of 10 to 1,000 rules: numpy costs about 15 us more
# per program instruction and segment (its plan programs run instruction by instruction in Python) and
# 1.4 ns more per gram x document than the kernels, and importing numba, setting it up and loading the
# cached kernels costs 0.3 s. So numpy wins while its extra cost stays under that: 100 rules over 3,300
# documents take 0.49 s with numpy, 0.68 s compiled; 1,000 rules 2.7 s and 1.8 s.
NUMPY_EXTRA_SECONDS_PER_STEP = 15e-6
NUMPY_EXTRA_SECONDS_PER_CELL = 1.4e-9
COMPILED_LOAD_SECONDS = 0.3


def compiled_pays(steps: int, cells: int) -> bool:
    """Is a search that runs `steps` program instructions x segments and reads `cells` grams x documents
    (summed over its segments and batches) worth loading the compiled kernels for, in a process that has
    not loaded them yet?"""
    extra = steps * NUMPY_EXTRA_SECONDS_PER_STEP + cells * NUMPY_EXTRA_SECONDS_PER_CELL
    return extra > COMPILED_LOAD_SECONDS


def read_leaves(
    reader: SegmentReader,
    tier: int,
    h2: np.ndarray,
    k: int,
    keep: np.ndarray | None = None,
    compiled: bool = True,
    out: np.ndarray | None = None,
    dest: np.ndarray | None = None,
) -> np.ndarray:
    """Gram rows: row dest[g] of `out` (uint64, rows x bitmaps.words(docs), zeroed; by default a new one
    with dest[g] = g) becomes the bitmap of the documents whose `tier` bloom may hold the gram with hash
    half h2[g], among the documents of the bitmap `keep` (None: all of them). Returns `out`."""
    if out is None:
        out = bitmaps.empty(len(h2), reader.docs)
    if dest is None:
        dest = np.arange(len(h2), dtype=np.int64)
    if not len(h2) or not reader.docs:
        return out
    h2 = np.ascontiguousarray(h2, dtype=np.uint64)
    keep_bytes = np.empty(0, dtype=np.uint8) if keep is None else keep.view(np.uint8)
    out_bytes = out.view(np.uint8)
    if compiled:
        from sspry.features import kernels  # numba: see the module docstring

        arrays = reader.class_arrays(tier)
        kernels.gather_rows(
            reader.blooms,
            arrays.offsets,
            arrays.blocks,
            arrays.counts,
            arrays.starts,
            arrays.members,
            tier == 1,
            h2,
            np.asarray(dest, dtype=np.int64),
            k,
            keep_bytes,
            out_bytes,
        )
    else:
        _gather_numpy(reader, tier, h2, k, keep, out_bytes, np.asarray(dest, dtype=np.intp))
    return out


def _gather_numpy(
    reader: SegmentReader,
    tier: int,
    h2: np.ndarray,
    k: int,
    keep: np.ndarray | None,
    out: np.ndarray,
    dest: np.ndarray,
) -> None:
    """`kernels.gather_rows` with numpy, one class at a time (`out` as bytes)."""
    kept = None if keep is None else bitmaps.unpack(keep, reader.docs)
    for index, span in enumerate(reader.classes[tier]):
        members = reader.class_members(tier, index)  # ascending
        wanted = None if kept is None else kept[members]
        if wanted is not None and not wanted.any():
            continue
        sliced, tail = reader.class_matrices(tier, index)
        positions = bloom_positions(h2, span.blocks, k).astype(np.intp)  # grams x k
        full = sliced.shape[1] * 8
        if full:
            # sliced[positions]: grams x k x q bytes; bit b of byte j is document 8j+b of the class
            present = np.bitwise_and.reduce(sliced[positions], axis=1)
            if tier == 1:
                if wanted is not None:
                    present &= np.packbits(wanted[:full], bitorder="little")
                at, shift = divmod(span.start, 8)
                q = present.shape[1]
                if shift == 0:
                    out[dest, at : at + q] |= present
                else:
                    out[dest, at : at + q] |= present << np.uint8(shift)
                    out[dest, at + 1 : at + q + 1] |= present >> np.uint8(8 - shift)
            else:
                bits = np.unpackbits(present, axis=1, bitorder="little").view(bool)
                _scatter(out, dest, bits, members[:full], None if wanted is None else wanted[:full])
        if len(tail):
            bits = tail[:, positions >> 3] >> (positions & 7).astype(np.uint8)  # tail docs x grams x k
            present = (bits & 1).all(axis=2).T
            _scatter(out, dest, present, members[full:], None if wanted is None else wanted[full:])


def _scatter(out: np.ndarray, dest: np.ndarray, bits: np.ndarray, docs: np.ndarray, wanted) -> None:
    """Set the bit of document docs[j] in byte row dest[g] of `out` where bits[g, j] (and wanted[j])."""
    if wanted is not None:
        bits, docs = bits[:, wanted], docs[wanted]
    g, j = np.nonzero(bits)
    if len(g):
        d = docs[j]
        np.bitwise_or.at(out, (dest[g], d >> 3), (1 << (d & 7)).astype(np.uint8))


def probe_leaves(
    reader: SegmentReader,
    tier: int,
    h2: np.ndarray,
    k: int,
    plans: np.ndarray,
    plan_starts: np.ndarray,
    plan_rows: np.ndarray,
    candidates: np.ndarray,
    out: np.ndarray,
    compiled: bool = True,
) -> None:
    """Gram rows document at a time: for each plan p of `plans` and each document of its bitmap
    candidates[p], set the document's bit in row r of `out` (bitmaps) for every gram row r of the plan
    (plan_rows[plan_starts[p]:plan_starts[p + 1]], rows of h2) whose k probe bits its bloom holds.
    k byte reads per (document, gram): for plans with few survivors, far less than `read_leaves`' pass
    over every class."""
    if not len(plans) or not reader.docs:
        return
    arrays = reader.class_arrays(tier)
    h2 = np.ascontiguousarray(h2, dtype=np.uint64)
    if compiled:
        from sspry.features import kernels  # numba: see the module docstring

        kernels.probe_rows(
            reader.blooms,
            arrays.offsets,
            arrays.blocks,
            arrays.counts,
            arrays.doc_class,
            arrays.doc_column,
            h2,
            k,
            np.asarray(plans, dtype=np.int64),
            plan_starts,
            plan_rows,
            candidates,
            out,
        )
        return
    out_bytes = out.view(np.uint8)
    for plan in np.asarray(plans).tolist():
        docs = bitmaps.documents(candidates[plan], reader.docs)
        rows = plan_rows[plan_starts[plan] : plan_starts[plan + 1]]
        if not len(docs) or not len(rows):
            continue
        classes = arrays.doc_class[docs]
        for index in np.unique(classes).tolist():
            members = docs[classes == index]
            columns = arrays.doc_column[members]
            span = reader.classes[tier][index]
            sliced, tail = reader.class_matrices(tier, index)
            positions = bloom_positions(h2[rows], span.blocks, k).astype(np.intp)  # grams x k
            full = sliced.shape[1] * 8
            present = np.zeros((len(rows), len(members)), dtype=bool)
            inside = columns < full
            if inside.any():
                cols = columns[inside]
                values = sliced[positions[:, :, None], (cols >> 3)[None, None, :]] >> (cols & 7).astype(
                    np.uint8
                )
                present[:, inside] = (values & 1).all(axis=1)
            if not inside.all():
                cols = columns[~inside] - full
                values = tail[cols[None, None, :], (positions >> 3)[:, :, None]] >> (positions & 7)[
                    :, :, None
                ].astype(np.uint8)
                present[:, ~inside] = (values & 1).all(axis=1)
            g, j = np.nonzero(present)
            if len(g):
                d = members[j]
                np.bitwise_or.at(out_bytes, (rows[g], d >> 3), (1 << (d & 7)).astype(np.uint8))
