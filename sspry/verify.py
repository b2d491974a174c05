"""YARA verification of candidates over their stored paths (yara-python).

Each candidate file is read once: its Source ID is recomputed and compared, so a file that changed or
vanished since it was indexed is reported as skipped instead of being called a match; then the compiled
rules scan it. Scans run on a thread pool (yara-python releases the GIL while scanning).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import yara

from sspry.policy import Policy
from sspry.query.results import SearchResult

IN_MEMORY_BYTES = 256 << 20
SCAN_TIMEOUT_S = 120


@dataclass
class Verdict:
    matched: frozenset[str] = frozenset()
    skipped: str | None = None


def scan_file(path: str, source_id: bytes, rules: yara.Rules, policy: Policy) -> Verdict:
    try:
        size = os.path.getsize(path)
        hasher = policy.new_id_hasher()
        data = None
        with open(path, "rb") as handle:
            if size <= IN_MEMORY_BYTES:
                data = handle.read()
                hasher.update(data)
            else:
                for block in iter(lambda: handle.read(16 << 20), b""):
                    hasher.update(block)
        if hasher.digest() != source_id:
            return Verdict(skipped="file changed since it was indexed")
        found = (
            rules.match(data=data, timeout=SCAN_TIMEOUT_S)
            if data is not None
            else rules.match(path, timeout=SCAN_TIMEOUT_S)
        )
    except FileNotFoundError:
        return Verdict(skipped="file no longer exists")
    except OSError as exc:
        return Verdict(skipped=f"cannot read file: {exc.strerror}")
    except yara.Error as exc:
        return Verdict(skipped=f"yara: {exc}")
    return Verdict(matched=frozenset(m.rule for m in found))


def verify(result: SearchResult, rules: yara.Rules, policy: Policy, workers: int = 0) -> None:
    """Fill in `verified` / `skipped` of every candidate of `result`."""
    jobs: dict[tuple[bytes, str | None], Verdict | None] = {}
    for rule in result.rules:
        for candidate in rule.candidates:
            jobs.setdefault((candidate.source_id, candidate.path), None)
    workers = workers or min(4, len(os.sched_getaffinity(0)))

    def run(key: tuple[bytes, str | None]) -> Verdict:
        source_id, path = key
        if path is None:
            return Verdict(skipped="no stored path (initialise the forest with --store-path)")
        return scan_file(path, source_id, rules, policy)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-verify") as pool:
        for key, verdict in zip(jobs, pool.map(run, list(jobs)), strict=True):
            jobs[key] = verdict
    for rule in result.rules:
        for candidate in rule.candidates:
            verdict = jobs[(candidate.source_id, candidate.path)]
            assert verdict is not None
            if verdict.skipped:
                candidate.verified, candidate.skipped = None, verdict.skipped
            else:
                candidate.verified = rule.rule in verdict.matched
