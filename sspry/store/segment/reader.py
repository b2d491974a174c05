"""Reading a segment (see format.py) through memory maps: opening one reads no bloom bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sspry.store.errors import format_error
from sspry.store.segment.format import (
    BLOOMS,
    COLUMNS,
    FIELD_ARRAYS,
    FIELD_NAMES,
    LEGACY_PATH_OFFSETS,
    LEGACY_PATHS,
    META,
    SEGMENT_FORMAT,
    ClassSpan,
    column_file,
)


@dataclass(frozen=True)
class ClassArrays:
    offsets: np.ndarray  # per class: byte offset of its matrix in blooms.bin
    blocks: np.ndarray  # per class: bloom size in blocks
    counts: np.ndarray  # per class: documents
    starts: np.ndarray  # per class: first position in `members`
    members: np.ndarray  # documents in class order (tier 1: 0..docs-1; tier 2: t2_order)
    doc_class: np.ndarray  # per document: its class
    doc_column: np.ndarray  # per document: its position in its class


class SegmentReader:
    """Read access to a segment through memory maps (opening costs no reads of the blooms)."""

    # the columns of format.COLUMNS, set from the schema (declared here for readers of the code)
    ids: np.ndarray
    id_order: np.ndarray
    filesize: np.ndarray
    entropy: np.ndarray
    prefix: np.ndarray
    prefix_len: np.ndarray
    entry: np.ndarray
    entry_len: np.ndarray
    scanned: np.ndarray
    estimates: np.ndarray
    t2_order: np.ndarray

    def __init__(self, directory: Path):
        self.directory = directory
        meta = json.loads((directory / META).read_text())
        found = meta.get("format", 1)
        if found != SEGMENT_FORMAT:
            raise format_error(directory / META, "segment", found, SEGMENT_FORMAT)
        self.docs: int = meta["docs"]
        self.classes = {tier: [ClassSpan(**span) for span in meta["classes"][str(tier)]] for tier in (1, 2)}
        # plain ndarray views of the maps: numpy's memmap subclass adds overhead to every indexing
        load = lambda name: np.asarray(np.load(directory / column_file(name), mmap_mode="r"))  # noqa: E731
        self.columns: dict[str, np.ndarray] = {c.name: load(c.name) for c in COLUMNS}
        for name, array in self.columns.items():
            setattr(self, name, array)
        self.field_names: list[str] = json.loads((directory / FIELD_NAMES).read_text())
        self._field_name, self._field_doc, self._field_value = (load(name) for name in FIELD_ARRAYS)
        self._fields: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.blooms = np.asarray(np.memmap(directory / BLOOMS, dtype=np.uint8, mode="r"))
        self._paths: tuple[np.ndarray, np.memmap | bytes] | None = None
        if (directory / LEGACY_PATH_OFFSETS).exists():
            offsets = np.load(directory / LEGACY_PATH_OFFSETS)
            size = int(offsets[-1])
            blob = np.asarray(np.memmap(directory / LEGACY_PATHS, dtype=np.uint8, mode="r")) if size else b""
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
