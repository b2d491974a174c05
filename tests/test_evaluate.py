"""Packed evaluation (gather, programs, Tier 2 by class or by document, liveness) against a plain
reference: each document's stored bloom tested gram by gram and each plan evaluated per document."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from sspry.bloom import bloom_positions, gram_hash_bytes, ladder
from sspry.policy import BLOCK_BITS, Policy
from sspry.query import bitmaps, evaluate, program
from sspry.query.evaluate import SegmentEvaluator, evaluate_snapshot
from sspry.query.facts import evaluate_fact
from sspry.query.plan import (
    FALSE,
    TRUE,
    And,
    AtLeast,
    BytesAt,
    Const,
    Entropy,
    Filesize,
    Gram,
    Node,
    Not,
    Or,
    ReadInt,
    and_,
    at_least,
    not_,
    or_,
)
from sspry.query.results import SearchResult
from sspry.query.search import search_snapshot
from sspry.store.forest import SegmentView, Snapshot
from sspry.store.manifest import SegmentEntry
from sspry.store.segment import FreshPart, SegmentReader, build_segment
from tests.test_store import make_doc

POLICY = Policy()


def build_view(tmp_path, name: str, rng: random.Random, count: int) -> SegmentView:
    """A segment of `count` random documents in a few classes per tier (odd sizes, so sliced parts and
    tails of 1 to 7 documents), some of them deleted."""
    sizes = [int(s) for s in ladder(POLICY.ladder_steps)]
    tier1 = rng.sample(sizes[:6], rng.randint(1, 4))
    tier2 = rng.sample(sizes[:6], rng.randint(1, 4))
    docs = [make_doc(POLICY, rng, (rng.choice(tier1), rng.choice(tier2))) for _ in range(count)]
    build_segment(tmp_path / name, [FreshPart(docs, POLICY)], POLICY)
    reader = SegmentReader(tmp_path / name)
    live = np.array([rng.random() < 0.85 for _ in range(reader.docs)], dtype=bool)
    entry = SegmentEntry(name, reader.docs, int((~live).sum()))
    return SegmentView(0, 0, entry, reader, live)


class Reference:
    """One segment, document by document: its stored blooms and columns."""

    def __init__(self, view: SegmentView):
        self.reader = view.reader
        self.live = view.live
        self.blooms = {tier: [self._bloom(d, tier) for d in range(self.reader.docs)] for tier in (1, 2)}
        self.facts: dict[Node, np.ndarray] = {}

    def _bloom(self, doc: int, tier: int) -> np.ndarray:
        blocks = int(self.reader.doc_blocks(tier)[doc])
        index = self.reader.class_index(tier, blocks)
        column = int(self.reader.class_columns(tier, np.array([doc]))[0])
        return self.reader.row_bits(tier, index, 0, blocks * BLOCK_BITS)[:, column]

    def holds(self, node: Node, doc: int) -> bool:
        if isinstance(node, Gram):
            bloom = self.blooms[node.tier][doc]
            h2 = np.array([gram_hash_bytes(node.gram)], dtype=np.uint64)
            positions = bloom_positions(h2, len(bloom) // BLOCK_BITS, POLICY.tier_k(node.tier))[0]
            return bool(bloom[positions.astype(np.intp)].all())
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Not):
            return not self.holds(node.child, doc)
        if isinstance(node, AtLeast):
            return sum(self.holds(c, doc) for c in node.children) >= node.k
        if isinstance(node, And):
            return all(self.holds(c, doc) for c in node.children)
        if isinstance(node, Or):
            return any(self.holds(c, doc) for c in node.children)
        if node not in self.facts:
            self.facts[node] = evaluate_fact(node, self.reader)
        return bool(self.facts[node][doc])

    def candidates(self, plan: Node) -> np.ndarray:
        return np.array([self.live[d] and self.holds(plan, d) for d in range(self.reader.docs)], dtype=bool)


# byte sets of about half the values, few of them: BytesAt facts share (offset, set) tests
BYTE_SETS = [sum(1 << b for b in random.Random(i).sample(range(256), 128)) for i in range(3)]


def random_fact(rng: random.Random) -> Node:
    op = rng.choice(["<", "<=", ">", ">=", "==", "!="])
    kind = rng.randrange(4)
    if kind == 0:
        return Filesize(op, rng.randrange(1 << 30))
    if kind == 1:
        return Entropy(op, rng.random() * 8)
    if kind == 2:
        return BytesAt("prefix", rng.randrange(4), tuple(rng.choices(BYTE_SETS, k=rng.randint(1, 3))))
    return ReadInt("prefix", rng.randrange(4), 1, False, False, 0xFF, op, rng.randrange(256))


def random_plan(rng: random.Random, grams: list[Gram], depth: int = 0) -> Node:
    """A plan as the planner makes them: gram leaves only un-negated, `not` only over facts."""
    roll = rng.random()
    if depth >= 3 or roll < 0.3:
        leaf = rng.random()
        if leaf < 0.75:
            return rng.choice(grams)
        if leaf < 0.9:
            return random_fact(rng)
        if leaf < 0.95:
            return not_(random_fact(rng))
        return rng.choice([TRUE, FALSE])
    children = [random_plan(rng, grams, depth + 1) for _ in range(rng.randint(2, 6))]
    if roll < 0.55:
        return and_(*children)
    if roll < 0.8:
        return or_(*children)
    children += rng.sample(children, rng.randint(0, len(children)))  # repeats count once each
    return at_least(rng.randint(1, len(children)), children)


def random_grams(rng: random.Random, count: int) -> list[Gram]:
    found = {Gram(tier, rng.randbytes(3 if tier == 1 else 4)) for tier in (1, 2) for _ in range(count)}
    return sorted(found, key=lambda g: (g.tier, g.gram))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("compiled", [True, False])
def test_packed_evaluation_equals_the_reference(tmp_path, monkeypatch, seed: int, compiled: bool) -> None:
    rng = random.Random(seed)
    views = [
        build_view(tmp_path, f"s{i}", rng, n) for i, n in enumerate(rng.sample([1, 7, 9, 64, 70, 131], 4))
    ]
    grams = random_grams(rng, 12)
    plans = [random_plan(rng, grams) for _ in range(40)]
    plans += [
        grams[0],
        TRUE,
        FALSE,
        random_fact(rng),
        *(BytesAt("prefix", offset, (BYTE_SETS[0],)) for offset in range(3)),
        and_(*grams[:3]),
        AtLeast(2, grams[0], grams[0], grams[1]),
    ]
    references = [Reference(view) for view in views]
    expect = [[ref.candidates(plan) for ref in references] for plan in plans]
    snapshot = Snapshot(1, views)
    # by class and by document for Tier 2, batches of one plan or all, on the caller's thread or the pool
    for probe_limit, leaf_bits, inline_cells in ((0, 1 << 30, 1 << 30), (1 << 30, 1, 0), (4, 1 << 30, 0)):
        monkeypatch.setattr(SegmentEvaluator, "_probe_limit", lambda self, limit=probe_limit: limit)
        monkeypatch.setattr(evaluate, "LEAF_BITS", leaf_bits)
        monkeypatch.setattr(evaluate, "MIN_BATCH_GRAMS", 1)
        monkeypatch.setattr(evaluate, "INLINE_CELLS", inline_cells)
        hits = evaluate_snapshot(snapshot, plans, POLICY, compiled_gather=compiled)
        for p, plan in enumerate(plans):
            got = [np.zeros(v.reader.docs, dtype=bool) for v in views]
            for view_index, bitmap in hits[p]:
                assert bitmap.dtype == np.uint64 and len(bitmap) == bitmaps.words(
                    views[view_index].reader.docs
                )
                assert bitmaps.count(bitmap) == len(bitmaps.documents(bitmap, 1 << 20))  # nothing past docs
                got[view_index] = bitmaps.unpack(bitmap, views[view_index].reader.docs)
                assert got[view_index].any()
            for view_index in range(len(views)):
                assert np.array_equal(got[view_index], expect[p][view_index]), (plan, view_index, probe_limit)


def test_kernels_and_programs_agree_on_numbers() -> None:
    """kernels.run_program spells program.py's opcodes and operand kinds as numbers."""
    assert (program.AND, program.OR, program.AT_LEAST, program.NOT, program.CONST) == (0, 1, 2, 3, 4)
    assert (program.TIER1, program.TIER2, program.FACT, program.VALUE) == (0, 1, 2, 3)


def test_at_least_counts_every_occurrence_in_both_runners() -> None:
    """AT_LEAST over up to 40 operands (counters of 6 bits), repeats included, any k."""
    rng = np.random.default_rng(3)
    docs = 200
    rows = rng.integers(0, 2**64, (12, bitmaps.words(docs)), dtype=np.uint64)
    bits = np.array([bitmaps.unpack(r, docs) for r in rows])
    for operands in ([0, 1], [0, 0, 1], list(range(12)), [int(i) for i in rng.integers(0, 12, 40)]):
        grams = [Gram(1, bytes([i, 0, 0])) for i in range(12)]
        for k in {1, 2, len(operands) // 2, len(operands) - 1, len(operands)}:
            plan = AtLeast(k, *(grams[i] for i in operands))
            leaves = program.Leaves([plan])
            code = program.Program.compile([plan], leaves)
            order = [int(g.gram[0]) for g in leaves.grams[1]]
            expect = bits[operands].sum(axis=0) >= k
            for compiled in (True, False):
                out = bitmaps.empty(1, docs)
                nonempty = np.zeros(1, dtype=bool)
                live = bitmaps.pack(np.ones(docs, dtype=bool))[None]
                args = (rows[order], bitmaps.empty(0, docs), bitmaps.empty(0, docs), live, False, out)
                if compiled:
                    from sspry.features import kernels

                    scratch = np.empty((code.slots, out.shape[1]), dtype=np.uint64)
                    counters = np.empty((code.counter_rows, out.shape[1]), dtype=np.uint64)
                    kernels.run_program(
                        code.code, code.refs, code.emits, code.deps_start, code.deps, np.ones(1, np.uint8),
                        args[0], args[1], args[2], scratch, counters, live, False, out, nonempty,
                    )  # fmt: skip
                else:
                    program.run_numpy(code, *args, np.ones(1, dtype=bool), nonempty)
                assert np.array_equal(bitmaps.unpack(out[0], docs), expect), (operands, k, compiled)
                assert nonempty[0] == expect.any()


def test_search_snapshot_returns_the_reference_source_ids_and_stops_when_cancelled(tmp_path) -> None:
    rng = random.Random(9)
    views = [build_view(tmp_path, f"s{i}", rng, n) for i, n in enumerate((23, 150))]
    grams = random_grams(rng, 8)
    plans = [random_plan(rng, grams) for _ in range(10)]
    from sspry.query.ruleplan import RulePlan

    rule_plans = [RulePlan(f"r{i}", plan) for i, plan in enumerate(plans)]
    snapshot = Snapshot(1, views)
    result = search_snapshot(snapshot, rule_plans, POLICY)
    assert isinstance(result, SearchResult) and result.documents == snapshot.documents
    references = [Reference(view) for view in views]
    for plan, rule in zip(plans, result.rules, strict=True):
        expect = [
            ref.reader.source_id(int(d)) for ref in references for d in np.flatnonzero(ref.candidates(plan))
        ]
        assert [c.source_id for c in rule.candidates] == expect
    cancelled = threading.Event()
    cancelled.set()
    stopped = search_snapshot(snapshot, rule_plans, POLICY, cancelled=cancelled)
    assert all(rule.candidate_count == 0 for rule in stopped.rules)
