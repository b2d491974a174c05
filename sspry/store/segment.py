"""Immutable segments: documents stored column-wise, blooms bit-sliced per size class.

A segment is a directory written once and never changed. It is built under a fresh temporary name and
renamed into place complete (diskio), so a segment's final name never holds a partial one:

  segment.json      format version, document count and the class tables of both tiers
  blooms.bin        every class matrix of both tiers, back to back
  ids.npy           Source IDs (docs x id_bytes), in document order
  id_order.npy      argsort of ids, for binary search by Source ID
  filesize.npy, entropy.npy, prefix.npy (docs x prefix_bytes), prefix_len.npy
  entry.npy (docs x 16), entry_len.npy, scanned.npy   entry-point bytes; whether YARA's modules ran
  estimates.npy (docs x 2)   the distinct-gram estimates the blooms were sized from
  field_names.json, field_doc.npy, field_name.npy, field_value.npy   module fields, sparse (name indexes
                    are uint32 from this format on; segments written before hold uint16 and read the same)
  t2_order.npy      document indices grouped by Tier 2 class

Paths are not stored here: a document's paths change (files.py, the file catalog, holds them). Segments
written before the catalog existed hold them in paths.bin / path_offsets.npy, read once to fill it.

Documents are ordered by Tier 1 class, so a Tier 1 class is a contiguous range of documents; a Tier 2
class is a range of `t2_order`. Within every class the documents appear in ascending document order.

A class of `count` documents with blooms of `nbits` bits is stored as count = 8*q + r:
  * a bit-sliced matrix of nbits rows x q bytes: row p holds bit p of the first 8*q documents, so a query
    gram costs k row reads of q bytes each, whatever the bloom size;
  * the r < 8 remaining documents' blooms as plain rows (r x nbits/8 bytes), so no class ever pays padding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sspry.document import ENTRY_BYTES, Document
from sspry.policy import BLOCK_BITS, Policy
from sspry.store import diskio
from sspry.store.errors import format_error
from sspry.store.killpoints import kill_point

SEGMENT_FORMAT = 1  # segment.json without a "format" field: written before it existed, the same layout
CHUNK_CELLS = 1 << 25  # bits held in memory per transposition step (rows x documents)


@dataclass(frozen=True)
class ClassSpan:
    blocks: int  # bloom size in 512-bit blocks
    start: int  # first document (tier 1) or first position in t2_order (tier 2)
    count: int
    offset: int  # byte offset of the class matrix in blooms.bin

    @property
    def nbits(self) -> int:
        return self.blocks * BLOCK_BITS

    @property
    def sliced_bytes(self) -> int:
        return self.nbits * (self.count // 8)

    @property
    def size(self) -> int:
        return self.sliced_bytes + (self.count % 8) * (self.nbits // 8)


@dataclass(frozen=True)
class ClassArrays:
    offsets: np.ndarray  # per class: byte offset of its matrix in blooms.bin
    blocks: np.ndarray  # per class: bloom size in blocks
    counts: np.ndarray  # per class: documents
    starts: np.ndarray  # per class: first position in `members`
    members: np.ndarray  # documents in class order (tier 1: 0..docs-1; tier 2: t2_order)
    doc_class: np.ndarray  # per document: its class
    doc_column: np.ndarray  # per document: its position in its class


class Part:
    """Documents that go into a new segment, and a way to read their bloom bits by row ranges."""

    size: int
    blocks: dict[int, np.ndarray]  # tier -> per-document class (blocks), in the part's document order

    def columns(self) -> dict[str, object]:
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
        self._stacked: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def columns(self) -> dict[str, object]:
        return {
            "ids": np.frombuffer(b"".join(d.source_id for d in self.docs), dtype=np.uint8).reshape(
                self.size, self.policy.id_bytes
            ),
            "filesize": np.array([d.filesize for d in self.docs], dtype=np.uint64),
            "entropy": np.array([d.entropy for d in self.docs], dtype=np.float64),
            "prefix": _padded([d.prefix for d in self.docs], self.policy.prefix_bytes),
            "prefix_len": np.array([len(d.prefix) for d in self.docs], dtype=np.uint16),
            "entry": _padded([d.entry_bytes for d in self.docs], ENTRY_BYTES),
            "entry_len": np.array([len(d.entry_bytes) for d in self.docs], dtype=np.uint8),
            "scanned": np.array([d.modules_scanned for d in self.docs], dtype=bool),
            "estimates": np.array([(d.tier1_estimate, d.tier2_estimate) for d in self.docs], dtype=np.uint64),
            "fields": [d.fields for d in self.docs],
        }

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

    def columns(self) -> dict[str, object]:
        seg, keep = self.segment, self.keep
        return {
            "ids": seg.ids[keep],
            "filesize": seg.filesize[keep],
            "entropy": seg.entropy[keep],
            "prefix": seg.prefix[keep],
            "prefix_len": seg.prefix_len[keep],
            "entry": seg.entry[keep],
            "entry_len": seg.entry_len[keep],
            "scanned": seg.scanned[keep],
            "estimates": seg.estimates[keep],
            "fields": seg.doc_fields(keep),
        }

    def class_bits(self, tier: int, blocks: int, local: np.ndarray, r0: int, r1: int) -> np.ndarray:
        span_index = self.segment.class_index(tier, blocks)
        columns = self.segment.class_columns(tier, self.keep[local])
        return self.segment.row_bits(tier, span_index, r0, r1)[:, columns]


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


def _write_segment(directory: Path, parts: Sequence[Part], policy: Policy) -> int:
    origin = [(p, i) for p, part in enumerate(parts) for i in range(part.size)]
    t1 = np.array([parts[p].blocks[1][i] for p, i in origin], dtype=np.int64)
    t2 = np.array([parts[p].blocks[2][i] for p, i in origin], dtype=np.int64)
    order = np.argsort(t1, kind="stable")  # output document j comes from origin[order[j]]
    t1, t2 = t1[order], t2[order]
    t2_order = np.argsort(t2, kind="stable")
    total = len(order)

    columns = [part.columns() for part in parts]
    part_of = np.array([p for p, _ in origin], dtype=np.int64)[order]
    local_of = np.array([i for _, i in origin], dtype=np.int64)[order]

    def gather(name: str, dtype, shape=()) -> np.ndarray:
        out = np.empty((total, *shape), dtype=dtype)
        for p, cols in enumerate(columns):
            mask = part_of == p
            out[mask] = np.asarray(cols[name])[local_of[mask]]
        return out

    ids = gather("ids", np.uint8, (policy.id_bytes,))
    arrays = {
        "ids": ids,
        "id_order": np.lexsort(ids.T[::-1]).astype(np.uint32),
        "filesize": gather("filesize", np.uint64),
        "entropy": gather("entropy", np.float64),
        "prefix": gather("prefix", np.uint8, (policy.prefix_bytes,)),
        "prefix_len": gather("prefix_len", np.uint16),
        "entry": gather("entry", np.uint8, (ENTRY_BYTES,)),
        "entry_len": gather("entry_len", np.uint8),
        "scanned": gather("scanned", bool),
        "estimates": gather("estimates", np.uint64, (2,)),
        "t2_order": t2_order.astype(np.uint32),
    }
    for name, array in arrays.items():
        diskio.save_array(directory / f"{name}.npy", array)
    _save_fields(directory, [columns[p]["fields"][i] for p, i in zip(part_of, local_of, strict=True)])
    kill_point("segment.columns")

    tables: dict[str, list[dict]] = {}
    with diskio.OutFile(directory / "blooms.bin", exclusive=True) as out:
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
    diskio.write_file(directory / "segment.json", json.dumps(meta).encode())
    return total


def _padded(values: Sequence[bytes], width: int) -> np.ndarray:
    out = np.zeros((len(values), width), dtype=np.uint8)
    for i, value in enumerate(values):
        out[i, : len(value)] = np.frombuffer(value, dtype=np.uint8)
    return out


def _save_fields(directory: Path, per_doc: Sequence[dict[str, int]]) -> None:
    """Module fields, sparse: (doc, name index, value) triples sorted by name, then document."""
    names = sorted({name for fields in per_doc for name in fields})
    index = {name: i for i, name in enumerate(names)}
    triples = sorted((index[n], d, v) for d, fields in enumerate(per_doc) for n, v in fields.items())
    diskio.write_file(directory / "field_names.json", json.dumps(names).encode())
    diskio.save_array(directory / "field_name.npy", np.array([t[0] for t in triples], dtype=np.uint32))
    diskio.save_array(directory / "field_doc.npy", np.array([t[1] for t in triples], dtype=np.uint32))
    diskio.save_array(directory / "field_value.npy", np.array([t[2] for t in triples], dtype=np.int64))


class SegmentReader:
    """Read access to a segment through memory maps (opening costs no reads of the blooms)."""

    def __init__(self, directory: Path):
        self.directory = directory
        meta = json.loads((directory / "segment.json").read_text())
        found = meta.get("format", 1)
        if found != SEGMENT_FORMAT:
            raise format_error(directory / "segment.json", "segment", found, SEGMENT_FORMAT)
        self.docs: int = meta["docs"]
        self.classes = {tier: [ClassSpan(**span) for span in meta["classes"][str(tier)]] for tier in (1, 2)}
        # plain ndarray views of the maps: numpy's memmap subclass adds overhead to every indexing
        load = lambda name: np.asarray(np.load(directory / f"{name}.npy", mmap_mode="r"))  # noqa: E731
        self.ids = load("ids")
        self.id_order = load("id_order")
        self.filesize = load("filesize")
        self.entropy = load("entropy")
        self.prefix = load("prefix")
        self.prefix_len = load("prefix_len")
        self.entry = load("entry")
        self.entry_len = load("entry_len")
        self.scanned = load("scanned")
        self.estimates = load("estimates")
        self.field_names: list[str] = json.loads((directory / "field_names.json").read_text())
        self._field_name = load("field_name")
        self._field_doc = load("field_doc")
        self._field_value = load("field_value")
        self._fields: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.t2_order = load("t2_order")
        self.blooms = np.asarray(np.memmap(directory / "blooms.bin", dtype=np.uint8, mode="r"))
        self._paths: tuple[np.ndarray, np.memmap | bytes] | None = None
        if (directory / "path_offsets.npy").exists():
            offsets = load("path_offsets")
            size = int(offsets[-1])
            blob = np.asarray(np.memmap(directory / "paths.bin", dtype=np.uint8, mode="r")) if size else b""
            self._paths = (offsets, blob)
        self._blocks_cache: dict[int, np.ndarray] = {}
        self._class_arrays: dict[int, ClassArrays] = {}
        self._t2_position: np.ndarray | None = None

    # --- documents ---------------------------------------------------------------------------------
    def legacy_path(self, doc: int) -> str | None:
        """The path a segment written before the file catalog stored for `doc` (None: none stored)."""
        if self._paths is None:
            return None
        offsets, blob = self._paths
        raw = bytes(blob[int(offsets[doc]) : int(offsets[doc + 1])])
        return raw.decode("utf-8", "surrogateescape") or None

    def field(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(present, value) of a module field for every document."""
        found = self._fields.get(name)
        if found is None:
            present = np.zeros(self.docs, dtype=bool)
            values = np.zeros(self.docs, dtype=np.int64)
            if name in self.field_names:
                code = self.field_names.index(name)
                lo, hi = np.searchsorted(self._field_name, [code, code + 1])
                docs = self._field_doc[lo:hi]
                present[docs] = True
                values[docs] = self._field_value[lo:hi]
            found = self._fields[name] = (present, values)
        return found

    def doc_fields(self, docs: np.ndarray) -> list[dict[str, int]]:
        """The module fields of each of `docs`, as dicts (compaction input)."""
        position = {int(d): i for i, d in enumerate(docs)}
        out: list[dict[str, int]] = [{} for _ in docs]
        for name, doc, value in zip(
            self._field_name.tolist(), self._field_doc.tolist(), self._field_value.tolist(), strict=True
        ):
            at = position.get(doc)
            if at is not None:
                out[at][self.field_names[name]] = value
        return out

    def source_id(self, doc: int) -> bytes:
        return self.ids[doc].tobytes()

    def find(self, source_ids: Sequence[bytes]) -> np.ndarray:
        """Document index of each Source ID, or -1 where absent."""
        if not len(source_ids) or not self.docs:
            return np.full(len(source_ids), -1, dtype=np.int64)
        width = self.ids.shape[1]
        keys = np.frombuffer(b"".join(source_ids), dtype=f"V{width}")
        sorted_ids = np.ascontiguousarray(self.ids).view(f"V{width}").ravel()[self.id_order]
        at = np.minimum(np.searchsorted(sorted_ids, keys), self.docs - 1)
        found = sorted_ids[at] == keys
        return np.where(found, self.id_order[at].astype(np.int64), -1)

    def doc_blocks(self, tier: int) -> np.ndarray:
        """Class (in blocks) of every document's bloom in `tier`."""
        cached = self._blocks_cache.get(tier)
        if cached is None:
            cached = np.empty(self.docs, dtype=np.int64)
            members = np.arange(self.docs) if tier == 1 else self.t2_order
            for span in self.classes[tier]:
                cached[members[span.start : span.start + span.count]] = span.blocks
            self._blocks_cache[tier] = cached
        return cached

    def class_arrays(self, tier: int) -> ClassArrays:
        """The tier's class geometry as arrays (for compiled readers), built once."""
        found = self._class_arrays.get(tier)
        if found is None:
            spans = self.classes[tier]
            members = (
                np.arange(self.docs, dtype=np.int64) if tier == 1 else np.asarray(self.t2_order, np.int64)
            )
            doc_class = np.empty(self.docs, dtype=np.int64)
            doc_column = np.empty(self.docs, dtype=np.int64)
            for index, span in enumerate(spans):
                doc_class[members[span.start : span.start + span.count]] = index
                doc_column[members[span.start : span.start + span.count]] = np.arange(span.count)
            found = ClassArrays(
                offsets=np.array([s.offset for s in spans], dtype=np.int64),
                blocks=np.array([s.blocks for s in spans], dtype=np.int64),
                counts=np.array([s.count for s in spans], dtype=np.int64),
                starts=np.array([s.start for s in spans], dtype=np.int64),
                members=members,
                doc_class=doc_class,
                doc_column=doc_column,
            )
            self._class_arrays[tier] = found
        return found

    def class_members(self, tier: int, index: int) -> np.ndarray:
        span = self.classes[tier][index]
        if tier == 1:
            return np.arange(span.start, span.start + span.count)
        return np.asarray(self.t2_order[span.start : span.start + span.count], dtype=np.int64)

    def class_index(self, tier: int, blocks: int) -> int:
        for index, span in enumerate(self.classes[tier]):
            if span.blocks == blocks:
                return index
        raise KeyError(blocks)

    def class_columns(self, tier: int, docs: np.ndarray) -> np.ndarray:
        """Column of each document inside its own class matrix."""
        if tier == 1:
            starts = np.array([s.start for s in self.classes[1]])
            return docs - starts[np.searchsorted(starts, docs, side="right") - 1]
        if self._t2_position is None:
            position = np.empty(self.docs, dtype=np.int64)
            for span in self.classes[2]:
                position[self.t2_order[span.start : span.start + span.count]] = np.arange(span.count)
            self._t2_position = position
        return self._t2_position[docs]

    # --- bloom bits --------------------------------------------------------------------------------
    def class_matrices(self, tier: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of a class's bit-sliced matrix (nbits x q bytes) and of its tail rows (r x nbits/8)."""
        span = self.classes[tier][index]
        q, r, row_bytes = span.count // 8, span.count % 8, span.nbits // 8
        sliced = self.blooms[span.offset : span.offset + span.sliced_bytes].reshape(span.nbits, q)
        tail_at = span.offset + span.sliced_bytes
        tail = self.blooms[tail_at : tail_at + r * row_bytes].reshape(r, row_bytes)
        return sliced, tail

    def row_bits(self, tier: int, index: int, r0: int, r1: int) -> np.ndarray:
        """Bloom rows r0..r1 (multiples of 8) of every document in the class: bool (r1-r0) x count."""
        span = self.classes[tier][index]
        sliced, tail = self.class_matrices(tier, index)
        bits = np.empty((r1 - r0, span.count), dtype=bool)
        full = sliced.shape[1] * 8
        if full:
            bits[:, :full] = np.unpackbits(np.asarray(sliced[r0:r1]), axis=1, bitorder="little")
        if tail.shape[0]:
            bits[:, full:] = np.unpackbits(
                np.asarray(tail[:, r0 // 8 : r1 // 8]), axis=1, bitorder="little"
            ).T
        return bits

    def bloom_bytes(self) -> int:
        return int(self.blooms.shape[0])
