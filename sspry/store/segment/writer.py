"""Writing a segment (see format.py) from parts: documents fresh from the ingest log, or the survivors of
existing segments (compaction). A segment is built under a fresh temporary name and renamed into place
complete (diskio), so a segment's final name never holds a partial one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sspry.document import Document
from sspry.policy import BLOCK_BITS, Policy
from sspry.store import diskio
from sspry.store.killpoints import kill_point
from sspry.store.segment.format import (
    BLOOMS,
    COLUMNS,
    FIELD_ARRAYS,
    FIELD_NAMES,
    META,
    SEGMENT_FORMAT,
    column_file,
)
from sspry.store.segment.reader import SegmentReader

CHUNK_CELLS = 1 << 25  # bits held in memory per transposition step (rows x documents)


class Part:
    """Documents that go into a new segment: their column values, their module fields, and a way to read
    their bloom bits by row ranges."""

    size: int
    blocks: dict[int, np.ndarray]  # tier -> per-document class (blocks), in the part's document order

    def column(self, name: str) -> np.ndarray:
        """The values of a column of format.COLUMNS that documents carry (not the derived ones)."""
        raise NotImplementedError

    def fields(self) -> list[dict[str, int]]:
        raise NotImplementedError

    def class_bits(self, tier: int, blocks: int, local: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Bits r0..r1 of the blooms of documents `local` (all in class `blocks`): bool (r1-r0) x len."""
        raise NotImplementedError


class FreshPart(Part):
    """Newly ingested documents, held in memory."""

    def __init__(self, docs: Sequence[Document], policy: Policy):
        self.docs = list(docs)
        self.policy = policy
        self.size = len(self.docs)
        self.blocks = {tier: np.array([d.blocks(tier) for d in self.docs], dtype=np.int64) for tier in (1, 2)}
        self._stacked: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self._by_name = {c.name: c for c in COLUMNS}

    def column(self, name: str) -> np.ndarray:
        of_documents = self._by_name[name].of_documents
        assert of_documents is not None
        return of_documents(self.docs, self.policy)

    def fields(self) -> list[dict[str, int]]:
        return [d.fields for d in self.docs]

    def class_bits(self, tier: int, blocks: int, local: np.ndarray, r0: int, r1: int) -> np.ndarray:
        key = (tier, blocks)
        cached = self._stacked.get(key)
        if cached is None or not np.array_equal(cached[0], local):
            matrix = np.stack([self.docs[i].bloom(tier) for i in local]) if len(local) else None
            cached = (local.copy(), matrix)
            self._stacked[key] = cached
        matrix = cached[1]
        if matrix is None:
            return np.zeros((r1 - r0, 0), dtype=bool)
        return np.unpackbits(matrix[:, r0 // 8 : r1 // 8], axis=1, bitorder="little").T


class SegmentPart(Part):
    """The surviving documents of an existing segment (compaction input)."""

    def __init__(self, segment: SegmentReader, keep: np.ndarray):
        self.segment = segment
        self.keep = np.flatnonzero(keep)  # part-local index -> segment document index
        self.size = len(self.keep)
        self.blocks = {tier: segment.doc_blocks(tier)[self.keep] for tier in (1, 2)}

    def column(self, name: str) -> np.ndarray:
        return self.segment.columns[name][self.keep]

    def fields(self) -> list[dict[str, int]]:
        return self.segment.doc_fields(self.keep)

    def class_bits(self, tier: int, blocks: int, local: np.ndarray, r0: int, r1: int) -> np.ndarray:
        span_index = self.segment.class_index(tier, blocks)
        columns = self.segment.class_columns(tier, self.keep[local])
        return self.segment.row_bits(tier, span_index, r0, r1)[:, columns]


def build_segment(directory: Path, parts: Sequence[Part], policy: Policy) -> int:
    """Write a new segment holding every document of `parts` at `directory` (which must not exist);
    returns its document count. It is built under a fresh temporary name and renamed into place once
    complete and durable; a build that fails removes what it wrote."""
    diskio.make_dirs(directory.parent)
    work = diskio.temp_name(directory)
    try:
        diskio.make_dirs(work)
        total = _write_segment(work, parts, policy)
        diskio.fsync_path(work)
        kill_point("segment.written")
        diskio.rename_into_place(work, directory)
    except BaseException:
        diskio.remove(work)
        raise
    kill_point("segment.renamed")
    return total


def _chunk_rows(nbits: int, docs: int) -> int:
    rows = max(8, (CHUNK_CELLS // max(docs, 1)) // 8 * 8)
    return min(rows, nbits)


def _write_class(out, parts: Sequence[Part], members: list[tuple[int, np.ndarray, np.ndarray]], tier, blocks):
    """Write one class matrix. members: (part index, part-local docs, output columns) per part."""
    count = sum(len(local) for _, local, _ in members)
    nbits = blocks * BLOCK_BITS
    full = count // 8 * 8
    tail = np.zeros((count - full, nbits // 8), dtype=np.uint8)  # packed: a huge bloom costs its size
    step = _chunk_rows(nbits, count)
    for r0 in range(0, nbits, step):
        r1 = min(nbits, r0 + step)
        bits = np.empty((r1 - r0, count), dtype=bool)
        for part_index, local, columns in members:
            bits[:, columns] = parts[part_index].class_bits(tier, blocks, local, r0, r1)
        if full:
            out.write(np.packbits(bits[:, :full], axis=1, bitorder="little").tobytes())
        if count > full:
            tail[:, r0 // 8 : r1 // 8] = np.packbits(bits[:, full:].T, axis=1, bitorder="little")
    if count > full:
        out.write(tail.tobytes())


def _write_segment(directory: Path, parts: Sequence[Part], policy: Policy) -> int:
    origin = [(p, i) for p, part in enumerate(parts) for i in range(part.size)]
    t1 = np.array([parts[p].blocks[1][i] for p, i in origin], dtype=np.int64)
    t2 = np.array([parts[p].blocks[2][i] for p, i in origin], dtype=np.int64)
    order = np.argsort(t1, kind="stable")  # output document j comes from origin[order[j]]
    t1, t2 = t1[order], t2[order]
    t2_order = np.argsort(t2, kind="stable")
    total = len(order)
    part_of = np.array([p for p, _ in origin], dtype=np.int64)[order]
    local_of = np.array([i for _, i in origin], dtype=np.int64)[order]

    arrays: dict[str, np.ndarray] = {}
    for column in COLUMNS:
        if column.of_documents is None:
            continue
        out = np.empty((total, *column.width(policy)), dtype=column.dtype)
        for p, part in enumerate(parts):
            mask = part_of == p
            out[mask] = part.column(column.name)[local_of[mask]]
        arrays[column.name] = out
    arrays["id_order"] = np.lexsort(arrays["ids"].T[::-1]).astype(np.uint32)
    arrays["t2_order"] = t2_order.astype(np.uint32)
    for column in COLUMNS:
        diskio.save_array(directory / column_file(column.name), arrays[column.name].astype(column.dtype))
    fields = [part.fields() for part in parts]
    _save_fields(directory, [fields[p][i] for p, i in zip(part_of, local_of, strict=True)])
    kill_point("segment.columns")

    tables: dict[str, list[dict]] = {}
    with diskio.OutFile(directory / BLOOMS, exclusive=True) as out:
        for tier, doc_blocks, sequence in ((1, t1, np.arange(total)), (2, t2, t2_order)):
            table = []
            sorted_blocks = doc_blocks[sequence]
            for blocks in np.unique(sorted_blocks):
                lo, hi = np.searchsorted(sorted_blocks, [blocks, blocks + 1])
                docs = sequence[lo:hi]  # output documents of this class, ascending
                members = []
                for p in range(len(parts)):
                    mask = part_of[docs] == p
                    if mask.any():
                        members.append((p, local_of[docs][mask], np.flatnonzero(mask)))
                offset = out.tell()
                _write_class(out, parts, members, tier, int(blocks))
                table.append(
                    {"blocks": int(blocks), "start": int(lo), "count": int(hi - lo), "offset": offset}
                )
            tables[str(tier)] = table
        out.sync()
    meta = {"format": SEGMENT_FORMAT, "docs": total, "classes": tables}
    diskio.write_file(directory / META, json.dumps(meta).encode())
    return total


def _save_fields(directory: Path, per_doc: Sequence[dict[str, int]]) -> None:
    """Module fields, sparse: (name index, doc, value) triples sorted by name, then document."""
    names = sorted({name for fields in per_doc for name in fields})
    index = {name: i for i, name in enumerate(names)}
    triples = sorted((index[n], d, v) for d, fields in enumerate(per_doc) for n, v in fields.items())
    diskio.write_file(directory / FIELD_NAMES, json.dumps(names).encode())
    for position, (name, dtype) in enumerate(FIELD_ARRAYS.items()):  # in the triples' order
        diskio.save_array(
            directory / column_file(name), np.array([t[position] for t in triples], dtype=dtype)
        )
