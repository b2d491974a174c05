"""Exact facts from a segment's columns: file size, entropy, Source ID, module fields, stored bytes.

`evaluate_fact` returns a boolean per document of the segment, `packed_facts` the same as packed
bitmaps (query/bitmaps.py) for plan evaluation, kept per segment (segments never change) so a rule
searched again does not evaluate its facts again. These are the only leaves besides grams; they are
exact, which is what lets `not` and `lower` bounds use them (see plan.Approx).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from functools import cache, lru_cache

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
    if isinstance(node, BytesAt):  # searches compute these together (_packed_bytes_at); this one is
        # the plain form the tests' reference evaluators hold them to
        data, length = _stored(reader, node.source)
        result = np.asarray(length) >= node.offset + len(node.seq)
        for i, mask in enumerate(node.seq):
            result &= _membership(mask)[np.asarray(data[:, node.offset + i])]
        return result
    raise TypeError(f"not a fact: {node!r}")


FACT_CACHE_BITS = 1 << 28  # per segment: facts kept as bitmaps (32 MiB), least recently used out
_packed: weakref.WeakKeyDictionary[SegmentReader, OrderedDict[Node, np.ndarray]] = weakref.WeakKeyDictionary()
_packed_lock = threading.Lock()


def packed_facts(nodes: Sequence[Node], reader: SegmentReader) -> np.ndarray:
    """`evaluate_fact` of each node as packed bitmaps (rows in order), each remembered for the segment's
    lifetime (read-only: shared by searches)."""
    out = np.empty((len(nodes), bitmaps.words(reader.docs)), dtype=np.uint64)
    missing: list[int] = []
    with _packed_lock:
        kept = _packed.get(reader)
        if kept is None:
            kept = _packed[reader] = OrderedDict()
        for row, node in enumerate(nodes):
            found = kept.get(node)
            if found is None:
                missing.append(row)
            else:
                kept.move_to_end(node)
                out[row] = found
    if not missing:  # a search of rules seen before
        return out
    stored = [row for row in missing if isinstance(nodes[row], BytesAt)]
    if stored:
        out[stored] = _packed_bytes_at([nodes[row] for row in stored], reader)
    for row in missing:
        if not isinstance(nodes[row], BytesAt):
            out[row] = bitmaps.pack(evaluate_fact(nodes[row], reader))
    with _packed_lock:
        for row in missing:
            found = out[row].copy()
            found.flags.writeable = False
            kept[nodes[row]] = found
        while len(kept) > max(16, FACT_CACHE_BITS // max(reader.docs, 1)):
            kept.popitem(last=False)
    return out


def _packed_bytes_at(nodes: list[BytesAt], reader: SegmentReader) -> np.ndarray:
    """BytesAt facts, each the AND of its rows in one matrix of the distinct tests they make (`_tests`)."""
    tests, uses = _tests(tuple(nodes))
    rows = np.empty((len(tests), bitmaps.words(reader.docs)), dtype=np.uint64)
    for row, test in enumerate(tests):
        data, length = _stored(reader, test[0])
        if len(test) == 2:
            rows[row] = bitmaps.pack(np.asarray(length) >= test[1])
        else:
            rows[row] = bitmaps.pack(_membership(test[2])[np.asarray(data[:, test[1]])])
    return np.stack([np.bitwise_and.reduce(rows[used], axis=0) for used in uses])


@lru_cache(maxsize=16)  # a batch's facts are the same on every segment
def _tests(nodes: tuple[BytesAt, ...]) -> tuple[list[tuple], list[list[int]]]:
    """The distinct tests BytesAt facts make -- the stored length reaching a fact's end, (source, end),
    and each (source, offset, byte set) -- and the rows of those tests each fact is the AND of. A
    bundle's PEiD signatures are thousands of facts over a few thousand such positions (Yara-Rules: 3,121
    facts, 44,381 positions, 4,393 distinct), so each position is gathered once, not once per fact."""
    tests: dict[tuple, int] = {}
    uses = []
    for node in nodes:
        source, offset = node.source, node.offset
        used = [tests.setdefault((source, offset + len(node.seq)), len(tests))]
        used += [tests.setdefault((source, at, mask), len(tests)) for at, mask in enumerate(node.seq, offset)]
        uses.append(used)
    return list(tests), uses
