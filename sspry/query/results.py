"""What a search returns, local or remote: per rule candidates (with their recorded paths and, after
verification, the verdict), counts, truncation and where the time went.

Kept apart from the evaluator so clients of a server (and verification) load no compiled kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sspry.query.rules import RuleSource
    from sspry.store.files import PathsOf

# What verification can report of a match besides yes (Candidate.details): matched strings, tags, meta
MATCH_DETAILS = ("strings", "tags", "meta")
# Why a candidate could not be verified (Candidate.skipped)
SKIP_REASONS = ("no-path", "missing", "changed", "unreadable", "timeout", "error")
TIMING_STAGES = ("compile", "plan", "search", "verify")


@dataclass(slots=True)  # a bundle's search can hold a million of them
class Candidate:
    source_id: bytes
    paths: tuple[str, ...] = ()  # the first recorded paths of the document
    path_count: int = 0  # how many paths are recorded in all
    stamps: tuple[tuple[int, int], ...] = ()  # (size, mtime_ns) of each path when indexed (not printed)
    verified: bool | None = None  # None: not verified, or could not be (see skipped)
    skipped: str | None = None  # one of SKIP_REASONS
    skip_detail: str | None = None  # the error behind it
    details: dict | None = None  # for a match, what was asked of it: "tags", "meta", "matches"

    @property
    def outcome(self) -> str:
        """ "match", "no-match", "skipped:REASON", or "unverified"."""
        if self.skipped:
            return f"skipped:{self.skipped}"
        if self.verified is None:
            return "unverified"
        return "match" if self.verified else "no-match"

    def to_json(self) -> dict:
        out = {
            "source_id": self.source_id.hex(),
            "paths": list(self.paths),
            "path_count": self.path_count,
            "verified": self.verified,
        }
        if self.skipped:
            out["skipped"] = self.skipped
            out["skip_detail"] = self.skip_detail
        if self.details:
            out.update(self.details)
        return out


@dataclass
class RuleResult:
    name: str
    candidates: list[Candidate]
    candidate_count: int  # before truncation
    truncated: bool = False
    limit: int | None = None
    counted_only: bool = False  # only the count was asked for (`--count`)
    notes: list[str] = field(default_factory=list)  # the plan's note codes: what only verification decides

    def to_json(self) -> dict:
        out = {"rule": self.name, "candidate_count": self.candidate_count, "truncated": self.truncated}
        if self.notes:
            out["notes"] = self.notes
        if not self.counted_only:
            out["candidates"] = [c.to_json() for c in self.candidates]
        if self.limit is not None:
            out["truncated_limit"] = self.limit
        return out

    def verified_counts(self) -> dict[str, int]:
        rows = self.candidates
        return {
            "verified_checked": sum(1 for c in rows if c.verified is not None),
            "verified_matched": sum(1 for c in rows if c.verified),
            "verified_skipped": sum(1 for c in rows if c.skipped),
        }


@dataclass
class SearchResult:
    rules: list[RuleResult]
    documents: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms; "total": wall clock
    servers: list[str] = field(default_factory=list)  # the servers that answered (remote searches)
    offline: list[str] = field(default_factory=list)  # servers skipped with --ignore-offline
    verification: dict | None = None  # what verifying took (files, bytes, rates), when it ran

    @property
    def elapsed_ms(self) -> float:
        return self.timings_ms.get("total", sum(self.timings_ms.get(s, 0.0) for s in TIMING_STAGES))

    def to_json(self) -> dict:
        return {"rules": [r.to_json() for r in self.rules], **self.summary_json()}

    def summary_json(self) -> dict:
        """`to_json()` without the rules (for output written rule by rule; never built with them: the
        rules of a verified bundle come to hundreds of MB of dictionaries)."""
        out = {
            "documents": self.documents,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "timings_ms": {
                k: round(self.timings_ms[k], 3) for k in (*TIMING_STAGES, "total") if k in self.timings_ms
            },
        }
        if self.servers:
            out["servers"] = self.servers
        if self.offline:
            out["offline_servers"] = self.offline
        if self.verification is not None:
            out["verification"] = self.verification
        return out


def candidate_limit(documents: int, percent: float) -> int | None:
    """The cap `--max-candidates PCT` puts on one rule's candidates (None: unlimited)."""
    if percent <= 0:
        return None
    return max(1, math.ceil(documents * percent / 100.0))


def rule_result(
    name: str, source_ids: Sequence[bytes], limit: int | None, count: int | None = None
) -> RuleResult:
    """A rule's candidates, deduplicated in first-seen order, then cut at `limit`. `count`: the rule's
    candidates in all, when `source_ids` holds only some of them (a server sent at most a limit)."""
    unique = list(dict.fromkeys(source_ids))
    total = len(unique) if count is None else max(count, len(unique))
    truncated = limit is not None and total > limit
    kept = unique[:limit] if limit is not None else unique
    return RuleResult(
        name=name,
        candidates=[Candidate(i) for i in kept],
        candidate_count=total,
        truncated=truncated,
        limit=limit if truncated else None,
    )


def effective_limit(documents: int, max_candidates: float, limit: int | None) -> int | None:
    """Candidates listed per rule: the --max-candidates percent cap and the --limit count, the smaller."""
    caps = [c for c in (candidate_limit(documents, max_candidates), limit) if c is not None]
    return min(caps) if caps else None


class SearchStream:
    """A search's rule results as they come, in rule order: iterate it once. `documents` is known from
    the start; `timings_ms` is complete once the stream is exhausted. `collect()` gathers the rest into
    a SearchResult."""

    def __init__(self, targets: Sequence[str], documents: int, timings_ms: dict[str, float] | None = None):
        self.targets = list(targets)  # the rules it will give, in order
        self.documents = documents
        self.timings_ms = timings_ms if timings_ms is not None else {}
        self.servers: list[str] = []
        self.offline: list[str] = []
        self.compiled = None  # the yara.Rules the search compiled, for verification
        self.source: RuleSource | None = None  # and what they were loaded from (text, parse, externals)
        self._rules: Iterator[RuleResult] = iter(())

    def feed(self, rules: Iterator[RuleResult]) -> SearchStream:
        self._rules = rules
        return self

    def __iter__(self) -> Iterator[RuleResult]:
        return self._rules

    def collect(self) -> SearchResult:
        """The rest of the results, gathered. A document's Source ID and paths are kept once however
        many rules name it: a whole rule set names each document hundreds of times (Yara-Rules over
        ~4,000 documents: a million candidates, ~250 MB less)."""
        rules, shared = [], {}
        for rule in self:
            for candidate in rule.candidates:
                first = shared.setdefault(candidate.source_id, candidate)
                if first is not candidate:
                    candidate.source_id, candidate.paths = first.source_id, first.paths
            rules.append(rule)
        return SearchResult(rules, self.documents, self.timings_ms, self.servers, self.offline)

    def summary_json(self) -> dict:
        """Everything of `SearchResult.to_json()` but the rules (for output written rule by rule)."""
        return SearchResult([], self.documents, self.timings_ms, self.servers, self.offline).summary_json()


def remembering(
    paths_of: Callable[[list[bytes]], dict[bytes, PathsOf]],
) -> Callable[[list[bytes]], dict[bytes, PathsOf]]:
    """`paths_of` looking each document up once: the rules of a bundle name the same documents again
    (the 1,000 rules of `scripts/bench.py` at 100,000 documents: 89,569 candidates, their lookups 0.72 s
    before, 0.37 s after). Holds one entry per distinct candidate, as the collected result does."""
    known: dict[bytes, PathsOf] = {}

    def remembered(source_ids: list[bytes]) -> dict[bytes, PathsOf]:
        fresh = [i for i in source_ids if i not in known]
        if fresh:
            known.update(paths_of(fresh))
        return {i: known[i] for i in source_ids if i in known}

    return remembered


def attach_paths(
    rules: Sequence[RuleResult], paths_of: Callable[[list[bytes]], dict[bytes, PathsOf]]
) -> None:
    """Fill in every candidate's recorded paths, looked up once per distinct document."""
    found = paths_of(list(dict.fromkeys(c.source_id for r in rules for c in r.candidates)))
    for rule in rules:
        for candidate in rule.candidates:
            paths = found.get(candidate.source_id)
            if paths is not None:
                candidate.paths, candidate.path_count, candidate.stamps = paths
