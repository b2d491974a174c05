"""Plan evaluation over the segments of a snapshot, on packed bits from the gather to each plan's bitmap.

Plans go in batches whose distinct grams stay bounded; a batch is compiled once (query/program.py: its
grams hashed and ordered by block, its facts listed, its plans turned into straight-line code), and
compiled batches are kept for the next search with the same plans. On every segment a batch runs twice:

  1. every plan with its Tier 2 leaves taken as TRUE (gram leaves only ever appear un-negated, see
     plan.Approx, so that is an upper bound) over the Tier 1 gram rows (gather.read_leaves), masked
     with the live documents;
  2. for the plans that kept a document and have Tier 2 grams, the full plans, masked with their result
     of 1, over Tier 2 rows read only for those plans' survivors: probed document by document for a plan
     with few survivors (gather.probe_leaves), gathered class by class for the others'.

Everything in between is a bitmap of 64 documents a word (query/bitmaps.py); the result per plan and
segment is the bitmap of its live candidate documents. Segments are independent: a search large enough
to gain from it spreads them over a thread pool kept for the process (the kernels release the GIL).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np

from sspry.policy import Policy
from sspry.query import bitmaps
from sspry.query.facts import packed_facts
from sspry.query.gather import compiled_pays, probe_leaves, read_leaves
from sspry.query.plan import Gram, Node, leaves
from sspry.query.program import Leaves, Program, run_numpy
from sspry.store.forest import SegmentView, Snapshot

LEAF_BITS = 1 << 29  # gram rows (grams x documents bits, 64 MiB) held per segment and tier in a batch
MIN_BATCH_GRAMS = 256  # however large the segments
INLINE_CELLS = 1 << 20  # a search reading fewer grams x documents runs on the caller's thread
BATCH_CACHE_COST = 1 << 21  # instructions and grams of the compiled batches kept for later searches

# Per plan and segment: (view index, bitmap of the plan's live candidates), for segments where it has any.
Hits = list[list[tuple[int, np.ndarray]]]


class Batch:
    """A batch of plans ready to run on any segment: leaves listed and hashed (Tier 1 and Tier 2 rows
    ordered by block), the full program and its Tier 1 bound compiled, and each plan's Tier 2 rows (read
    only where the plan survived Tier 1)."""

    def __init__(self, plans: Sequence[Node], table: Leaves | None = None):
        table = Leaves(plans) if table is None else table
        self.full = Program.compile(plans, table)
        self.tier1 = self.full.without_tier2()
        # a kept batch holds arrays only: the leaves' node tables and the instruction lists (Python
        # objects, tens of MB for 10,000 rules) only serve compiling
        self.full.ops = self.tier1.ops = []
        self.h2 = table.h2  # per tier, by row
        self.facts = table.facts
        self.tier2_grams = len(table.grams[2])
        self.grams = len(table.grams[1]) + len(table.grams[2])
        # per plan its Tier 2 rows (CSR: plan p's are tier2_rows[tier2_starts[p]:tier2_starts[p + 1]])
        self.tier2_starts, self.tier2_rows = self.full.tier2_starts, self.full.tier2_rows
        counts = np.diff(self.tier2_starts)
        self.tier2_plan = np.repeat(np.arange(len(plans), dtype=np.int64), counts)
        self.has_tier2 = counts > 0
        self.everyone = np.ones(len(plans), dtype=bool)
        self.cost = len(self.full.code) + len(self.tier1.code) + self.grams

    def tier2_rows_of(self, plans: np.ndarray) -> np.ndarray:
        """The Tier 2 rows the plans marked in `plans` (bool per plan) use, ascending."""
        return np.unique(self.tier2_rows[plans[self.tier2_plan]])


Layout = list[tuple[list[int], Batch]]  # the batches of a search: (plan indices, compiled batch)
_layouts: OrderedDict[tuple, Layout] = OrderedDict()
_layouts_lock = threading.Lock()


def compiled_batches(plans: Sequence[Node], max_grams: int) -> Layout:
    """`plans` in consecutive batches of at most `max_grams` distinct grams (one plan may have more),
    each compiled; kept for the next search with the same plans (least recently used out, by
    BATCH_CACHE_COST): plan nodes are interned, so the same rules planned again are the same key."""
    key = (tuple(plans), max_grams)
    with _layouts_lock:
        found = _layouts.get(key)
        if found is not None:
            _layouts.move_to_end(key)
            return found
    every = Leaves(plans)
    if len(every.grams[1]) + len(every.grams[2]) <= max_grams or len(plans) == 1:
        layout = [(list(range(len(plans))), Batch(plans, every))]
    else:
        groups = batches([frozenset(leaves(plan, Gram)) for plan in plans], max_grams)
        layout = [(group, Batch([plans[i] for i in group])) for group in groups]
    with _layouts_lock:
        _layouts[key] = layout
        total = sum(batch.cost for kept in _layouts.values() for _, batch in kept)
        while total > BATCH_CACHE_COST and len(_layouts) > 1:
            total -= sum(batch.cost for _, batch in _layouts.popitem(last=False)[1])
    return layout


class SegmentEvaluator:
    """One batch on one segment; `compiled` chooses the kernels or numpy (see gather.py)."""

    def __init__(self, view: SegmentView, batch: Batch, policy: Policy, compiled: bool = True):
        self.view = view
        self.reader = view.reader
        self.batch = batch
        self.k = _probes(policy)
        self.compiled = compiled

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """(plans x words bitmaps of each plan's live candidates, whether each has any)."""
        reader, batch = self.reader, self.batch
        words = bitmaps.words(reader.docs)
        facts = packed_facts(batch.facts, reader)
        tier1 = read_leaves(reader, 1, batch.h2[1], self.k[1], None, self.compiled)
        out = np.zeros((batch.tier1.outputs, words), dtype=np.uint64)
        nonempty = np.zeros(batch.tier1.outputs, dtype=bool)
        live = _live_bitmap(self.view)[None]
        self._run(batch.tier1, tier1, tier1[:0], facts, live, False, out, batch.everyone, nonempty)
        second = nonempty & batch.has_tier2
        if not second.any():
            return out, nonempty
        tier2 = np.zeros((batch.tier2_grams, words), dtype=np.uint64)
        # a plan with few survivors has its rows probed document by document, the others' rows are
        # gathered class by class for all their survivors
        survivors = np.bitwise_count(out).sum(axis=1)
        few = second & (survivors <= self._probe_limit())
        many = second & ~few
        if many.any():
            rows = batch.tier2_rows_of(many)
            keep = np.bitwise_or.reduce(out[many], axis=0)
            read_leaves(reader, 2, batch.h2[2][rows], self.k[2], keep, self.compiled, tier2, rows)
        if few.any():
            h2, starts, flat = batch.h2[2], batch.tier2_starts, batch.tier2_rows
            probe_leaves(
                reader, 2, h2, self.k[2], np.flatnonzero(few), starts, flat, out, tier2, self.compiled
            )
        self._run(batch.full, tier1, tier2, facts, out, True, out, second, nonempty)
        return out, nonempty

    def _probe_limit(self) -> int:
        """Survivors up to which probing a plan's Tier 2 grams document by document (k byte reads each)
        costs less than gathering them class by class (a pass over every class, documents / 8 bytes)."""
        return len(self.reader.classes[2]) + self.reader.docs // 64

    def _run(self, program: Program, tier1, tier2, facts, masks, per_plan, out, alive, nonempty) -> None:
        if not self.compiled:
            run_numpy(program, tier1, tier2, facts, masks, per_plan, out, alive, nonempty)
            return
        words = out.shape[1]
        _kernels().run_program(
            program.code,
            program.refs,
            program.emits,
            program.deps_start,
            program.deps,
            alive.view(np.uint8),
            tier1,
            tier2,
            facts,
            np.empty((program.slots, words), dtype=np.uint64),
            np.empty((program.counter_rows, words), dtype=np.uint64),
            masks,
            per_plan,
            out,
            nonempty,
        )


@cache
def _probes(policy: Policy) -> dict[int, int]:
    """k of each tier."""
    return {tier: policy.tier_k(tier) for tier in (1, 2)}


@cache
def _kernels():
    from sspry.features import kernels  # numba: see gather.py

    return kernels


_live: dict[int, tuple[weakref.ref, np.ndarray]] = {}
_live_lock = threading.Lock()


def _live_bitmap(view: SegmentView) -> np.ndarray:
    """The view's live documents as a bitmap, packed once per tombstone state (a snapshot's `live`
    arrays live as long as the snapshot and are never changed)."""
    key = id(view.live)
    found = _live.get(key)
    if found is not None and found[0]() is view.live:
        return found[1]
    packed = bitmaps.pack(view.live)
    with _live_lock:
        for stale in [k for k, (ref, _) in _live.items() if ref() is None]:
            del _live[stale]
        _live[key] = (weakref.ref(view.live), packed)
    return packed


def batches(plan_gram_sets: Sequence[frozenset], max_grams: int) -> list[list[int]]:
    """Consecutive plans grouped so that a batch's distinct grams stay under `max_grams`."""
    groups: list[list[int]] = []
    current: list[int] = []
    grams: set = set()
    for index, found in enumerate(plan_gram_sets):
        new = len(found - grams)
        if current and len(grams) + new > max_grams:
            groups.append(current)
            current, grams = [], set()
        current.append(index)
        grams |= found
    if current:
        groups.append(current)
    return groups


def _gather_choice(segments: int, cells: int, layout: Layout) -> bool:
    """Whether this search runs the compiled kernels (see gather.compiled_pays): every batch runs both its
    programs and reads its grams on every segment."""
    instructions = sum(len(batch.tier1.code) + len(batch.full.code) for _, batch in layout)
    return compiled_pays(instructions * segments, cells)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool kept for the process (starting threads per search costs more than a small search)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="sspry-search")
        return pool


def _shares(sizes: list[int], workers: int) -> list[list[int]]:
    """Segment indices in at most `workers` shares of about equal documents (largest first to the
    lightest share), each ascending: one task per worker, not one per segment."""
    loads = [0] * min(workers, len(sizes))
    shares: list[list[int]] = [[] for _ in loads]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        shares[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(share) for share in shares if share]


def evaluate_snapshot(
    snapshot: Snapshot,
    plans: Sequence[Node],
    policy: Policy,
    workers: int = 0,
    compiled_gather: bool | None = True,
    cancelled: threading.Event | None = None,
) -> Hits:
    """Evaluate plans (their upper bounds, e.g. RulePlan.upper) over every segment of a snapshot.

    Returns per plan a list of (view index, bitmap): the uint64 words (query/bitmaps.py, bitmaps.words
    of the segment's documents) of the plan's live candidates in that segment, for each segment where
    there is one. `compiled_gather`: run the compiled kernels (True: right for a long-lived process,
    which loads them once), numpy (False), or whichever costs this process less (None: a one-shot
    command; a small search then never imports numba). `workers`: segments evaluated at once (0: up to 4,
    as the machine has cores). Once `cancelled` is set no further segment is evaluated and the result is
    incomplete (the caller asked for that)."""
    hits: Hits = [[] for _ in plans]
    views = snapshot.views
    if not plans or not views:
        return hits
    workers = workers or min(4, len(os.sched_getaffinity(0)))
    documents = sum(v.reader.docs for v in views)
    largest = max(v.reader.docs for v in views)
    layout = compiled_batches(plans, max(MIN_BATCH_GRAMS, LEAF_BITS // max(largest, 1)))
    cells = sum(batch.grams for _, batch in layout) * documents
    if compiled_gather is None:
        compiled_gather = _gather_choice(len(views), cells, layout)
    inline = workers == 1 or len(views) == 1 or cells < INLINE_CELLS
    shares = _shares([v.reader.docs for v in views], 1 if inline else workers)
    for group, batch in layout:
        if cancelled is not None and cancelled.is_set():
            break

        def run(share: list[int], batch: Batch = batch) -> list[tuple[int, np.ndarray, np.ndarray]]:
            done = []
            for view_index in share:
                if cancelled is not None and cancelled.is_set():
                    break
                evaluator = SegmentEvaluator(views[view_index], batch, policy, compiled_gather)
                done.append((view_index, *evaluator.evaluate()))
            return done

        results = map(run, shares) if len(shares) == 1 else _pool(workers).map(run, shares)
        for done in results:
            for view_index, out, nonempty in done:
                for row in np.flatnonzero(nonempty).tolist():
                    hits[group[row]].append((view_index, out[row].copy()))
    if len(shares) > 1:
        for found in hits:
            found.sort(key=lambda hit: hit[0])
    return hits
