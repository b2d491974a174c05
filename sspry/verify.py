"""YARA verification of candidates over their recorded paths (yara-python).

Each candidate document is read once: its Source ID is recomputed and compared, so a file that changed
or vanished since it was indexed is skipped (with its reason) instead of being called a match; then the
compiled rules scan it. A document with several paths is scanned from the first that still holds its
content. Scans run on a thread pool (yara-python releases the GIL while scanning).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import yara

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.results import SearchResult

IN_MEMORY_BYTES = 256 << 20
SCAN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Verdict:
    matched: frozenset[str] = frozenset()
    skipped: str | None = None  # a results.SKIP_REASONS code
    detail: str | None = None


def scan_file(path: str, source_id: bytes, rules: yara.Rules, policy: Policy) -> Verdict:
    """Scan one file if it still holds the content `source_id` names."""
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
            return Verdict(skipped="changed", detail=f"{path}: file changed since it was indexed")
        found = (
            rules.match(data=data, timeout=SCAN_TIMEOUT_S)
            if data is not None
            else rules.match(path, timeout=SCAN_TIMEOUT_S)
        )
    except FileNotFoundError:
        return Verdict(skipped="missing", detail=f"{path}: file no longer exists")
    except OSError as exc:
        return Verdict(skipped="unreadable", detail=f"{path}: {exc.strerror or exc}")
    except yara.TimeoutError:
        return Verdict(skipped="timeout", detail=f"{path}: YARA took longer than {SCAN_TIMEOUT_S} s")
    except yara.Error as exc:
        return Verdict(skipped="error", detail=f"{path}: yara: {exc}")
    return Verdict(matched=frozenset(m.rule for m in found))


def scan_document(paths: tuple[str, ...], source_id: bytes, rules: yara.Rules, policy: Policy) -> Verdict:
    """Scan the first of `paths` that still holds the document; otherwise the first path's problem."""
    if not paths:
        why = "no recorded path" if policy.store_path else "the forest was initialised without --store-path"
        return Verdict(skipped="no-path", detail=why)
    first: Verdict | None = None
    for path in paths:
        verdict = scan_file(path, source_id, rules, policy)
        if verdict.skipped not in ("missing", "changed", "unreadable"):
            return verdict
        first = first or verdict
    assert first is not None
    return first


def verify(
    result: SearchResult, rules: yara.Rules, policy: Policy, workers: int = 0, progress: Progress = SILENT
) -> None:
    """Fill in `verified` (or `skipped` with its reason) of every candidate of `result`."""
    started = time.perf_counter()
    paths: dict[bytes, tuple[str, ...]] = {}
    for rule in result.rules:
        for candidate in rule.candidates:
            paths.setdefault(candidate.source_id, candidate.paths)
    workers = workers or min(4, len(os.sched_getaffinity(0)))
    verdicts: dict[bytes, Verdict] = {}
    with (
        progress.stage("verifying", len(paths), "file") as stage,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-verify") as pool,
    ):
        jobs = {pool.submit(scan_document, p, i, rules, policy): i for i, p in paths.items()}
        for future, source_id in jobs.items():
            verdicts[source_id] = future.result()
            stage.advance()
    for rule in result.rules:
        for candidate in rule.candidates:
            verdict = verdicts[candidate.source_id]
            if verdict.skipped:
                candidate.verified, candidate.skipped = None, verdict.skipped
                candidate.skip_detail = verdict.detail
            else:
                candidate.verified = rule.name in verdict.matched
    result.timings_ms["verify"] = (time.perf_counter() - started) * 1000
