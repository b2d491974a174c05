"""A search: plans of a rule file, evaluated over every segment of a snapshot, capped and reported.

Evaluation (query/evaluate.py) leaves each rule's candidates as packed bitmaps per segment; they become
Source IDs only here, at the end, for the SearchResult (or the stream) callers print.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query import bitmaps
from sspry.query.evaluate import Hits, evaluate_snapshot
from sspry.query.literals import DEFAULT_MAX_ANCHORS
from sspry.query.plancache import PlanCache
from sspry.query.results import (
    RuleResult,
    SearchResult,
    SearchStream,
    attach_paths,
    candidate_limit,
    effective_limit,
    remembering,
    rule_result,
)
from sspry.query.ruleplan import RulePlan
from sspry.query.rules import RuleSource, load_rules
from sspry.query.ruleset import gc_relaxed, iter_source_plans
from sspry.store.forest import Forest, Snapshot


def search_snapshot(
    snapshot: Snapshot,
    plans: list[RulePlan],
    policy: Policy,
    max_candidates: float = 0.0,
    workers: int = 0,
    compiled_gather: bool | None = True,
    cancelled: threading.Event | None = None,
) -> SearchResult:
    """Search a snapshot. `compiled_gather`: run the compiled kernels (True: right for a long-lived
    process, which loads them once), numpy (False), or whichever costs this process less (None: a
    one-shot command; a small search then never imports numba). Once `cancelled` is set no further
    segment is evaluated and the result is incomplete (the caller asked for that)."""
    started = time.perf_counter()
    hits = evaluate_snapshot(
        snapshot, [plan.upper for plan in plans], policy, workers, compiled_gather, cancelled
    )
    limit = candidate_limit(snapshot.documents, max_candidates)
    results = [
        rule_result(plan.name, candidate_ids(snapshot, found), limit)
        for plan, found in zip(plans, hits, strict=True)
    ]
    return SearchResult(results, snapshot.documents, {"search": (time.perf_counter() - started) * 1000})


def candidate_ids(snapshot: Snapshot, found: Hits, limit: int | None = None) -> list[bytes]:
    """The Source IDs of one plan's candidates (its bitmaps per segment), in segment and document order;
    the first `limit` of them when given."""
    ids: list[bytes] = []
    for view_index, bitmap in found:
        if limit is not None and len(ids) >= limit:
            break
        reader = snapshot.views[view_index].reader
        docs = bitmaps.documents(bitmap, reader.docs)
        if limit is not None:
            docs = docs[: limit - len(ids)]
        rows = np.ascontiguousarray(reader.ids[docs])
        ids.extend(rows.view(f"V{rows.shape[1]}").ravel().tolist())  # one bytes object per row
    return ids


def note_codes(plan: RulePlan) -> list[str]:
    """The codes of a plan's notes, each once, in order (rule-check explains them)."""
    return list(dict.fromkeys(note.code for note in plan.notes))


def hits_result(
    name: str, snapshot: Snapshot, found: Hits, limit: int | None, count_only: bool = False
) -> RuleResult:
    """One rule's result from its bitmaps: the count from the bits, Source IDs only for what is listed
    (at most `limit`; none when `count_only`). A content lives in one segment, so there is nothing to
    deduplicate."""
    count = sum(bitmaps.count(bitmap) for _, bitmap in found)
    if count_only:
        return RuleResult(name, [], count, counted_only=True)
    return rule_result(name, candidate_ids(snapshot, found, limit), limit, count)


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
    """Plan the rules of `source` (each namespace on its own, reusing what `plan_cache` holds), search a
    Forest with them, and stream the results rule by rule: the Source IDs and paths of one rule's
    candidates are looked up when that rule is reached, so memory stays flat whatever the number of
    candidates. `limit` lists at most that many per rule (the count is always complete); `count_only`
    lists none. `compiled_gather`
    as in search_snapshot."""
    started = time.perf_counter()
    plans = []
    with gc_relaxed():  # planning, compiling the batches and their results make objects that live on
        with progress.stage("planning", len(source.targets), "rule") as stage:
            for plan in iter_source_plans(source, forest.policy, max_anchors, cache=plan_cache):
                plans.append(plan)
                stage.advance()
        planned = time.perf_counter()
        snapshot = forest.snapshot()
        hits = evaluate_snapshot(
            snapshot, [plan.upper for plan in plans], forest.policy, workers, compiled_gather
        )
    cap = effective_limit(snapshot.documents, max_candidates, limit)
    stream = SearchStream(source.targets, snapshot.documents, {"plan": (planned - started) * 1000})
    stream.source = source

    paths_of = remembering(forest.paths_of)

    def rules() -> Iterator[RuleResult]:
        with gc_relaxed():  # the results and their paths, held until the caller is done with them
            for plan, found in zip(plans, hits, strict=True):
                rule = hits_result(plan.name, snapshot, found, cap, count_only)
                rule.notes = note_codes(plan)
                attach_paths([rule], paths_of)
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
    rule_path: str | list[str],
    max_candidates: float = 0.0,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    workers: int = 0,
    progress: Progress = SILENT,
    compiled_gather: bool | None = None,
    plan_cache: PlanCache | None = None,
) -> tuple[SearchResult, RuleSource]:
    """Load (compile and parse), plan (reusing what `plan_cache` holds) and search rule files
    (rules.rule_specs) on a Forest. `compiled_gather` as in search_snapshot; by default chosen for a
    one-shot command."""
    started = time.perf_counter()
    source = load_rules(path=rule_path)
    loaded = time.perf_counter()
    result = search_forest(
        forest, source, max_candidates, max_anchors, workers, progress, compiled_gather, plan_cache
    )
    result.timings_ms["compile"] = (loaded - started) * 1000
    return result, source
