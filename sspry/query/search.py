"""A search: plans of a rule file, evaluated over every segment of a snapshot, capped and reported.

Evaluation (query/evaluate.py) leaves each rule's candidates as packed bitmaps per segment; they become
Source IDs only here, at the end, for the SearchResult every caller prints or streams.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import yara

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query import bitmaps
from sspry.query.condition import RulePlan, plan_rules
from sspry.query.evaluate import Hits, evaluate_snapshot
from sspry.query.results import SearchResult, attach_paths, candidate_limit, rule_result
from sspry.query.rules import RuleSource, load_rule_file
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


def candidate_ids(snapshot: Snapshot, found: Hits) -> list[bytes]:
    """The Source IDs of one plan's candidates (its bitmaps per segment), in segment and document order."""
    ids: list[bytes] = []
    for view_index, bitmap in found:
        reader = snapshot.views[view_index].reader
        docs = bitmaps.documents(bitmap, reader.docs)
        rows = np.ascontiguousarray(reader.ids[docs])
        ids.extend(rows.view(f"V{rows.shape[1]}").ravel().tolist())  # one bytes object per row
    return ids


def search_forest(
    forest: Forest,
    source: RuleSource,
    max_candidates: float = 0.0,
    max_anchors: int = 16,
    workers: int = 0,
    progress: Progress = SILENT,
    compiled_gather: bool | None = None,
) -> SearchResult:
    """Plan the rules of `source` and search a Forest with them; candidates carry their paths.
    `compiled_gather` as in search_snapshot."""
    started = time.perf_counter()
    plans = plan_rules(source.text, source.targets, forest.policy, max_anchors, progress=progress)
    planned = time.perf_counter()
    snapshot = forest.snapshot()
    result = search_snapshot(snapshot, plans, forest.policy, max_candidates, workers, compiled_gather)
    attach_paths(result, forest.paths_of)
    result.timings_ms["plan"] = (planned - started) * 1000
    result.timings_ms["search"] = (time.perf_counter() - planned) * 1000
    return result


def search_rule_file(
    forest: Forest,
    rule_path: str,
    max_candidates: float = 0.0,
    max_anchors: int = 16,
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
