"""What a search returns, local or remote: per rule candidates, counts and truncation.

Kept apart from the evaluator so clients of a server (and verification) load no compiled kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Candidate:
    source_id: bytes
    path: str | None
    verified: bool | None = None  # None: not verified (or could not be: see skipped)
    skipped: str | None = None

    def to_json(self) -> dict:
        return {"source_id": self.source_id.hex(), "path": self.path, "verified": self.verified}


@dataclass
class RuleResult:
    rule: str
    candidates: list[Candidate]
    candidate_count: int  # before truncation
    truncated: bool = False
    limit: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {
            "rule": self.rule,
            "candidate_count": self.candidate_count,
            "truncated": self.truncated,
            "candidates": [c.to_json() for c in self.candidates],
        }
        if self.limit is not None:
            out["truncated_limit"] = self.limit
        return out


@dataclass
class SearchResult:
    rules: list[RuleResult]
    documents: int
    elapsed_ms: float
    servers: list[str] = field(default_factory=list)  # the servers that answered (remote searches)

    def to_json(self) -> dict:
        out = {
            "rules": [r.to_json() for r in self.rules],
            "documents": self.documents,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }
        if self.servers:
            out["servers"] = self.servers
        return out


def candidate_limit(documents: int, percent: float) -> int | None:
    """The cap `--max-candidates PCT` puts on one rule's candidates (None: unlimited)."""
    if percent <= 0:
        return None
    return max(1, math.ceil(documents * percent / 100.0))
