"""The segment format: what a segment directory holds, named and typed once (the writer and the reader
both follow it).

A segment is a directory written once and never changed:

  segment.json      format version, document count and the class tables of both tiers
  blooms.bin        every class matrix of both tiers, back to back
  <column>.npy      one array per column of COLUMNS, one row per document, in document order
  field_names.json, field_doc.npy, field_name.npy, field_value.npy   module fields, sparse: (name index,
                    document, value) triples sorted by name, then document (name indexes are uint32 from
                    format 1 on; older segments hold uint16 and read the same)

Paths are not stored here: a document's paths change (store/files.py, the file catalog, holds them).
Segments written before the catalog existed hold them in paths.bin / path_offsets.npy, read once to fill
it.

Documents are ordered by Tier 1 class, so a Tier 1 class is a contiguous range of documents; a Tier 2
class is a range of `t2_order`. Within every class the documents appear in ascending document order.

A class of `count` documents with blooms of `nbits` bits is stored as count = 8*q + r:
  * a bit-sliced matrix of nbits rows x q bytes: row p holds bit p of the first 8*q documents, so a query
    gram costs k row reads of q bytes each, whatever the bloom size;
  * the r < 8 remaining documents' blooms as plain rows (r x nbits/8 bytes), so no class ever pays padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sspry.document import ENTRY_BYTES, Document
from sspry.policy import BLOCK_BITS, Policy

SEGMENT_FORMAT = 1  # segment.json without a "format" field: written before it existed, the same layout
META = "segment.json"
BLOOMS = "blooms.bin"
FIELD_NAMES = "field_names.json"
FIELD_ARRAYS = {"field_name": np.uint32, "field_doc": np.uint32, "field_value": np.int64}
LEGACY_PATHS, LEGACY_PATH_OFFSETS = "paths.bin", "path_offsets.npy"


def column_file(name: str) -> str:
    return f"{name}.npy"


def _padded(values: Sequence[bytes], width: int) -> np.ndarray:
    out = np.zeros((len(values), width), dtype=np.uint8)
    for i, value in enumerate(values):
        out[i, : len(value)] = np.frombuffer(value, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class Column:
    """One per-document array: its dtype, its shape beyond the document axis, and how a new document's
    values are taken (None: derived by the writer from the other columns or the class order)."""

    name: str
    dtype: type
    width: Callable[[Policy], tuple[int, ...]]
    of_documents: Callable[[Sequence[Document], Policy], np.ndarray] | None


def _scalar(policy: Policy) -> tuple[int, ...]:
    return ()


COLUMNS: tuple[Column, ...] = (
    Column(
        "ids",
        np.uint8,
        lambda p: (p.id_bytes,),
        lambda docs, p: np.frombuffer(b"".join(d.source_id for d in docs), np.uint8).reshape(
            len(docs), p.id_bytes
        ),
    ),
    Column("id_order", np.uint32, _scalar, None),  # argsort of ids, for binary search by Source ID
    Column("filesize", np.uint64, _scalar, lambda docs, p: np.array([d.filesize for d in docs], np.uint64)),
    Column("entropy", np.float64, _scalar, lambda docs, p: np.array([d.entropy for d in docs], np.float64)),
    Column(
        "prefix",
        np.uint8,
        lambda p: (p.prefix_bytes,),
        lambda docs, p: _padded([d.prefix for d in docs], p.prefix_bytes),
    ),
    Column(
        "prefix_len", np.uint16, _scalar, lambda docs, p: np.array([len(d.prefix) for d in docs], np.uint16)
    ),
    Column(
        "entry",
        np.uint8,
        lambda p: (ENTRY_BYTES,),
        lambda docs, p: _padded([d.entry_bytes for d in docs], ENTRY_BYTES),
    ),
    Column(
        "entry_len", np.uint8, _scalar, lambda docs, p: np.array([len(d.entry_bytes) for d in docs], np.uint8)
    ),
    Column("scanned", np.bool_, _scalar, lambda docs, p: np.array([d.modules_scanned for d in docs], bool)),
    Column(
        "estimates",
        np.uint64,
        lambda p: (2,),
        lambda docs, p: np.array([(d.tier1_estimate, d.tier2_estimate) for d in docs], np.uint64).reshape(
            -1, 2
        ),
    ),
    Column("t2_order", np.uint32, _scalar, None),  # document indices grouped by Tier 2 class
)


@dataclass(frozen=True)
class ClassSpan:
    """One size class of one tier, as segment.json records it."""

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
