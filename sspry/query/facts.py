"""Exact facts from a segment's columns: file size, entropy, Source ID, module fields, stored bytes.

`evaluate_fact` returns a boolean per document of the segment, `packed_fact` the same as a packed
bitmap (query/bitmaps.py) for plan evaluation, kept per segment (segments never change) so a rule
searched again does not evaluate its facts again. These are the only leaves besides grams; they are
exact, which is what lets `not` and `lower` bounds use them (see plan.Approx).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import cache

import numpy as np

from sspry.query import bitmaps
from sspry.query.literals import members
from sspry.query.plan import BytesAt, Entropy, Field, Filesize, Identity, Node, ReadInt, Unscanned
from sspry.store.segment import SegmentReader

COMPARE = {
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


def _compare(values: np.ndarray, op: str, operand) -> np.ndarray:
    if op == "&":
        return (values & np.int64(operand)) != 0
    return COMPARE[op](values, operand)


def _stored(reader: SegmentReader, source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "prefix":
        return reader.prefix, reader.prefix_len
    return reader.entry, reader.entry_len


@cache
def _membership(mask: int) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(members(mask))] = True
    return table


def evaluate_fact(node: Node, reader: SegmentReader) -> np.ndarray:
    docs = reader.docs
    if isinstance(node, Filesize):
        if node.value < 0:  # file sizes are never negative
            return np.full(docs, node.op in (">", ">=", "!="), dtype=bool)
        return _compare(np.asarray(reader.filesize), node.op, np.uint64(node.value))
    if isinstance(node, Entropy):
        return _compare(np.asarray(reader.entropy), node.op, node.value)
    if isinstance(node, Identity):
        found = reader.find([node.source_id])[0]
        result = np.zeros(docs, dtype=bool)
        if found >= 0:
            result[found] = True
        return result
    if isinstance(node, Field):
        present, values = reader.field(node.name)
        return present & _compare(values, node.op, node.value)
    if isinstance(node, Unscanned):
        return ~np.asarray(reader.scanned, dtype=bool)
    if isinstance(node, ReadInt):
        data, length = _stored(reader, node.source)
        window = np.asarray(data[:, node.offset : node.offset + node.width], dtype=np.uint64)
        if node.big_endian:
            window = window[:, ::-1]
        values = np.zeros(docs, dtype=np.uint64)
        for i in range(node.width):
            values |= window[:, i] << np.uint64(8 * i)
        values &= np.uint64(node.mask)
        signed = values.astype(np.int64)
        if node.signed:
            bits = 8 * node.width
            signed = np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)
        return (np.asarray(length) >= node.offset + node.width) & _compare(signed, node.op, node.value)
    if isinstance(node, BytesAt):
        data, length = _stored(reader, node.source)
        result = np.asarray(length) >= node.offset + len(node.seq)
        for i, mask in enumerate(node.seq):
            result &= _membership(mask)[np.asarray(data[:, node.offset + i])]
        return result
    raise TypeError(f"not a fact: {node!r}")


FACT_CACHE_BITS = 1 << 28  # per segment: facts kept as bitmaps (32 MiB), least recently used out
_packed: weakref.WeakKeyDictionary[SegmentReader, OrderedDict[Node, np.ndarray]] = weakref.WeakKeyDictionary()
_packed_lock = threading.Lock()


def packed_fact(node: Node, reader: SegmentReader) -> np.ndarray:
    """`evaluate_fact` as a packed bitmap, remembered for the segment's lifetime (read-only: shared)."""
    with _packed_lock:
        kept = _packed.get(reader)
        if kept is None:
            kept = _packed[reader] = OrderedDict()
        found = kept.get(node)
        if found is not None:
            kept.move_to_end(node)
            return found
    found = bitmaps.pack(evaluate_fact(node, reader))
    found.flags.writeable = False
    with _packed_lock:
        kept[node] = found
        while len(kept) > max(16, FACT_CACHE_BITS // max(reader.docs, 1)):
            kept.popitem(last=False)
    return found
