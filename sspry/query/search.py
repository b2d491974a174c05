"""A search: plans of a rule file, evaluated over every segment of a snapshot, capped and reported.

Segments are independent, so they are evaluated on a thread pool (numpy and the memory maps release the
GIL). Rules of a big bundle go in batches so the per-segment leaf vectors stay bounded; within a batch a
gram shared by several rules is read once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yara

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.evaluate import Batch, SegmentEvaluator
from sspry.query.gather import compiled_pays
from sspry.query.literals import DEFAULT_MAX_ANCHORS
from sspry.query.plan import Gram, leaves
from sspry.query.plancache import PlanCache
from sspry.query.results import (
    RuleResult,
    SearchResult,
    SearchStream,
    attach_paths,
    candidate_limit,
    effective_limit,
    rule_result,
)
from sspry.query.ruleplan import RulePlan
from sspry.query.rules import RuleSource, load_rule_file
from sspry.query.ruleset import plan_rules
from sspry.store.forest import Forest, Snapshot

LEAF_CELLS = 1 << 26  # grams x documents held per segment and tier while a batch is evaluated


def _batches(plan_grams: list[set], max_grams: int) -> list[list[int]]:
    """Consecutive plans grouped so that a batch's distinct grams stay under `max_grams`."""
    batches: list[list[int]] = []
    current: list[int] = []
    grams: set = set()
    for index, found in enumerate(plan_grams):
        new = len(found - grams)
        if current and len(grams) + new > max_grams:
            batches.append(current)
            current, grams = [], set()
        current.append(index)
        grams |= found
    if current:
        batches.append(current)
    return batches


def _gather_choice(snapshot: Snapshot, plan_grams: list[set], batches: list[list[int]]) -> bool:
    """Whether this search gathers with the compiled kernel (see gather.compiled_pays): every batch reads
    its grams in every class of every segment."""
    views = snapshot.views
    classes = sum(len(v.reader.classes[1]) + len(v.reader.classes[2]) for v in views)
    documents = sum(v.reader.docs for v in views)
    grams = sum(len(set().union(*(plan_grams[i] for i in batch))) for batch in batches)
    return compiled_pays(classes * len(batches), grams * documents)


def search_snapshot(
    snapshot: Snapshot,
    plans: list[RulePlan],
    policy: Policy,
    max_candidates: float = 0.0,
    workers: int = 0,
    compiled_gather: bool | None = True,
    cancelled: threading.Event | None = None,
) -> SearchResult:
    """Search a snapshot. `compiled_gather`: read gram leaves with the compiled kernel (True: right for a
    long-lived process, which loads it once), with numpy (False), or with whichever costs this process
    less (None: a one-shot command; a small search then never imports numba). Once `cancelled` is set no
    further segment is evaluated and the result is incomplete (the caller asked for that)."""
    cancelled = cancelled or threading.Event()
    started = time.perf_counter()
    hits: list[list[tuple[int, np.ndarray]]] = [[] for _ in plans]  # per plan: (view index, docs)
    workers = workers or min(4, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-search") as pool:
        largest = max((v.reader.docs for v in snapshot.views), default=1)
        plan_grams = [leaves(plan.upper, Gram) for plan in plans]
        batches = _batches(plan_grams, max(256, LEAF_CELLS // max(largest, 1)))
        if compiled_gather is None:
            compiled_gather = _gather_choice(snapshot, plan_grams, batches)
        for batch in batches:
            if cancelled.is_set():
                break
            compiled = Batch([plans[i].upper for i in batch], [plan_grams[i] for i in batch])

            def run(view_index: int, compiled=compiled):
                if cancelled.is_set():
                    return view_index, None
                view = snapshot.views[view_index]
                return view_index, SegmentEvaluator(view, compiled, policy, compiled_gather).evaluate()

            for view_index, selected in pool.map(run, range(len(snapshot.views))):
                if selected is None:
                    continue
                for plan_index, mask in zip(batch, selected, strict=True):
                    docs = np.flatnonzero(mask)
                    if len(docs):
                        hits[plan_index].append((view_index, docs))
    readers = [v.reader for v in snapshot.views]
    limit = candidate_limit(snapshot.documents, max_candidates)
    results = [
        rule_result(
            plan.name,
            [readers[view].source_id(doc) for view, docs in found for doc in docs.tolist()],
            limit,
        )
        for plan, found in zip(plans, hits, strict=True)
    ]
    return SearchResult(results, snapshot.documents, {"search": (time.perf_counter() - started) * 1000})


def stream_forest(
    forest: Forest,
    source: RuleSource,
    max_candidates: float = 0.0,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    workers: int = 0,
    progress: Progress = SILENT,
    compiled_gather: bool | None = None,
    limit: int | None = None,
    count_only: bool = False,
    plan_cache: PlanCache | None = None,
) -> SearchStream:
    """Plan the rules of `source` (reusing what `plan_cache` holds), search a Forest with them, and
    stream the results rule by rule: the Source IDs and paths of one rule's candidates are looked up
    when that rule is reached, so memory stays flat whatever the number of candidates. `limit` lists at
    most that many per rule (the count is always complete); `count_only` lists none. `compiled_gather`
    as in search_snapshot."""
    started = time.perf_counter()
    plans = plan_rules(
        source.text, source.targets, forest.policy, max_anchors, progress=progress, cache=plan_cache
    )
    planned = time.perf_counter()
    snapshot = forest.snapshot()
    result = search_snapshot(snapshot, plans, forest.policy, 0.0, workers, compiled_gather)
    cap = 0 if count_only else effective_limit(snapshot.documents, max_candidates, limit)
    stream = SearchStream(source.targets, snapshot.documents, {"plan": (planned - started) * 1000})

    def rules() -> Iterator[RuleResult]:
        for found in result.rules:
            rule = rule_result(found.name, [c.source_id for c in found.candidates], cap)
            if count_only:
                rule.truncated, rule.limit, rule.counted_only = False, None, True
            attach_paths([rule], forest.paths_of)
            yield rule
        stream.timings_ms["search"] = (time.perf_counter() - planned) * 1000

    return stream.feed(rules())


def search_forest(
    forest: Forest,
    source: RuleSource,
    max_candidates: float = 0.0,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    workers: int = 0,
    progress: Progress = SILENT,
    compiled_gather: bool | None = None,
    plan_cache: PlanCache | None = None,
) -> SearchResult:
    """`stream_forest`, collected (reusing what `plan_cache` holds)."""
    stream = stream_forest(
        forest, source, max_candidates, max_anchors, workers, progress, compiled_gather, plan_cache=plan_cache
    )
    return stream.collect()


def search_rule_file(
    forest: Forest,
    rule_path: str,
    max_candidates: float = 0.0,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    workers: int = 0,
    progress: Progress = SILENT,
    compiled_gather: bool | None = None,
) -> tuple[SearchResult, yara.Rules]:
    """Load (compile and parse), plan and search one rule file on a Forest. `compiled_gather` as in
    search_snapshot; by default chosen for a one-shot command."""
    started = time.perf_counter()
    source, compiled = load_rule_file(rule_path)
    loaded = time.perf_counter()
    result = search_forest(forest, source, max_candidates, max_anchors, workers, progress, compiled_gather)
    result.timings_ms["compile"] = (loaded - started) * 1000
    return result, compiled
