"""What a search returns, local or remote: per rule candidates (with their recorded paths and, after
verification, the verdict), counts, truncation and where the time went.

Kept apart from the evaluator so clients of a server (and verification) load no compiled kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sspry.store.files import PathsOf

# Why a candidate could not be verified (Candidate.skipped)
SKIP_REASONS = ("no-path", "missing", "changed", "unreadable", "timeout", "error")
TIMING_STAGES = ("compile", "plan", "search", "verify")


@dataclass
class Candidate:
    source_id: bytes
    paths: tuple[str, ...] = ()  # the first recorded paths of the document
    path_count: int = 0  # how many paths are recorded in all
    verified: bool | None = None  # None: not verified, or could not be (see skipped)
    skipped: str | None = None  # one of SKIP_REASONS
    skip_detail: str | None = None  # the error behind it

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
        return out


@dataclass
class RuleResult:
    name: str
    candidates: list[Candidate]
    candidate_count: int  # before truncation
    truncated: bool = False
    limit: int | None = None

    def to_json(self) -> dict:
        out = {
            "rule": self.name,
            "candidate_count": self.candidate_count,
            "truncated": self.truncated,
            "candidates": [c.to_json() for c in self.candidates],
        }
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

    @property
    def elapsed_ms(self) -> float:
        return self.timings_ms.get("total", sum(self.timings_ms.get(s, 0.0) for s in TIMING_STAGES))

    def to_json(self) -> dict:
        out = {
            "rules": [r.to_json() for r in self.rules],
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
        return out

    def source_ids(self) -> list[bytes]:
        """Every distinct candidate, in first-seen order."""
        return list(dict.fromkeys(c.source_id for r in self.rules for c in r.candidates))


def candidate_limit(documents: int, percent: float) -> int | None:
    """The cap `--max-candidates PCT` puts on one rule's candidates (None: unlimited)."""
    if percent <= 0:
        return None
    return max(1, math.ceil(documents * percent / 100.0))


def rule_result(name: str, source_ids: Sequence[bytes], limit: int | None) -> RuleResult:
    """A rule's candidates, deduplicated in first-seen order, then capped at `limit`."""
    unique = list(dict.fromkeys(source_ids))
    truncated = limit is not None and len(unique) > limit
    kept = unique[:limit] if truncated else unique
    return RuleResult(
        name=name,
        candidates=[Candidate(i) for i in kept],
        candidate_count=len(unique),
        truncated=truncated,
        limit=limit if truncated else None,
    )


def attach_paths(result: SearchResult, paths_of: Callable[[list[bytes]], dict[bytes, PathsOf]]) -> None:
    """Fill in every candidate's recorded paths, looked up once per distinct document."""
    found = paths_of(result.source_ids())
    for rule in result.rules:
        for candidate in rule.candidates:
            paths = found.get(candidate.source_id)
            if paths is not None:
                candidate.paths, candidate.path_count = paths.paths, paths.count
