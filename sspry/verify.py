"""YARA verification of candidates over their recorded paths (yara-python).

Each candidate document is read once: its Source ID is recomputed and compared, so a file that changed
or vanished since it was indexed is skipped (with its reason) instead of being called a match. A
document with several paths is read from the first that still holds its content.

A file is scanned only with rules it is a candidate for, as far as that pays: the rules of a bundle are
split into groups, each compiled on its own (from yaramod's text of its rules, with the imports, global
rules and every rule they reference), and a file is scanned with the groups holding one of its rules.
Broad rules (candidates for much of what is verified) share one group, which nearly every file needs
anyway; selective rules go in small groups of rules whose candidates overlap, so a file meets few of
them. Scans run on a thread pool: yara-python releases the GIL while it scans, hashlib while it hashes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import yara
import yaramod

from sspry.policy import Policy, PolicyError
from sspry.progress import SILENT, Progress
from sspry.query.externals import Externals
from sspry.query.results import MATCH_DETAILS, SearchResult, SearchStream
from sspry.query.rules import parse

IN_MEMORY_BYTES = 256 << 20
MATCH_DATA_BYTES = 64  # of each matched string shown (`--print-strings`)
MATCHES_PER_RULE = 256  # string matches reported per rule and file; more is said with matches_truncated
SCAN_TIMEOUT_S = 120
BROAD_SHARE = 0.25  # a rule that is a candidate for this share of the verified files is broad
GROUP_RULES = 64  # selective rules per group
MIN_SPLIT_RULES = 32  # fewer rules than this are scanned as one group


@dataclass(frozen=True)
class Verdict:
    matched: frozenset[str] = frozenset()
    details: dict[str, dict] = field(default_factory=dict)  # rule -> what was asked of its match
    skipped: str | None = None  # a results.SKIP_REASONS code
    detail: str | None = None
    size: int = 0  # bytes read and scanned
    scans: int = 0  # rule groups it was scanned with


@dataclass(frozen=True)
class Group:
    """Rules compiled together, and the target rules among them this verification asks about."""

    names: frozenset[str]
    rules: yara.Rules


@dataclass
class VerifyStats:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    groups: int = 0
    scans: int = 0  # (file, group) scans

    def to_json(self) -> dict:
        per_s = self.seconds or 1e-9
        return {
            "files": self.files,
            "bytes": self.bytes,
            "mb_per_s": round(self.bytes / 1e6 / per_s, 2),
            "files_per_s": round(self.files / per_s, 1),
            "rule_groups": self.groups,
            "group_scans": self.scans,
        }


@dataclass
class _Document:
    paths: tuple[str, ...]
    rules: set[str] = field(default_factory=set)


def _read(path: str, source_id: bytes, policy: Policy) -> tuple[bytes | None, Verdict | None, int]:
    """The file's bytes (None when too big to hold: scan it by path), or why it cannot be verified."""
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
    except FileNotFoundError:
        return None, Verdict(skipped="missing", detail=f"{path}: file no longer exists"), 0
    except OSError as exc:
        return None, Verdict(skipped="unreadable", detail=f"{path}: {exc.strerror or exc}"), 0
    if hasher.digest() != source_id:
        return None, Verdict(skipped="changed", detail=f"{path}: file changed since it was indexed"), 0
    return data, None, size


def shown(data: bytes) -> str:
    """Matched bytes as text: printable ASCII as it is, anything else (and backslash, quote) as \\xNN."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in data)


def match_details(match: yara.Match, asked: Collection[str]) -> dict:
    """What `asked` (results.MATCH_DETAILS) wants of one rule's match: its tags, its meta, and its
    string matches (identifier, offset, the first MATCH_DATA_BYTES of the data; at most MATCHES_PER_RULE,
    in offset order)."""
    out: dict = {}
    if "tags" in asked:
        out["tags"] = list(match.tags)
    if "meta" in asked:
        out["meta"] = dict(match.meta)
    if "strings" in asked:
        found = sorted(
            (instance.offset, string.identifier, instance.matched_data)
            for string in match.strings
            for instance in string.instances
        )
        out["matches"] = [
            {"identifier": name, "offset": offset, "data": shown(data[:MATCH_DATA_BYTES])}
            for offset, name, data in found[:MATCHES_PER_RULE]
        ]
        if len(found) > MATCHES_PER_RULE:
            out["matches_truncated"] = True
    return out


def _scan(path: str, data: bytes | None, size: int, groups: list[Group], asked: Collection[str]) -> Verdict:
    matched: set[str] = set()
    details: dict[str, dict] = {}
    try:
        for group in groups:
            found = (
                group.rules.match(data=data, timeout=SCAN_TIMEOUT_S)
                if data is not None
                else group.rules.match(path, timeout=SCAN_TIMEOUT_S)
            )
            matched.update(m.rule for m in found)
            if asked:
                details.update((m.rule, match_details(m, asked)) for m in found)
    except yara.TimeoutError:
        return Verdict(skipped="timeout", detail=f"{path}: YARA took longer than {SCAN_TIMEOUT_S} s")
    except yara.Error as exc:
        return Verdict(skipped="error", detail=f"{path}: yara: {exc}")
    return Verdict(matched=frozenset(matched), details=details, size=size, scans=len(groups))


def scan_document(
    paths: tuple[str, ...], source_id: bytes, groups: list[Group], policy: Policy, asked: Collection[str] = ()
) -> Verdict:
    """Scan the first of `paths` that still holds the document with `groups`; otherwise report the first
    path's problem. `asked`: the match details wanted (results.MATCH_DETAILS)."""
    if not paths:
        why = "no recorded path" if policy.store_path else "the forest was initialised without --store-path"
        return Verdict(skipped="no-path", detail=why)
    first: Verdict | None = None
    for path in paths:
        data, problem, size = _read(path, source_id, policy)
        if problem is None:
            return _scan(path, data, size, groups, asked)
        first = first or problem
    assert first is not None
    return first


def _references(rule: yaramod.Rule, names: set[str]) -> set[str]:
    """The rules a rule's condition names."""
    found: set[str] = set()

    class Names(yaramod.ObservingVisitor):
        def visit_IdExpression(self, expr) -> None:
            if expr.symbol.name in names:
                found.add(expr.symbol.name)

    Names().observe(rule.condition)
    return found


def rule_groups(
    wanted: dict[str, set[bytes]],
    compiled: yara.Rules,
    parsed: yaramod.YaraFile | str | None,
    externals: Externals | None = None,
) -> list[Group]:
    """Split the target rules with candidates (`wanted`: rule -> its candidate documents) into groups
    (see the module docstring). `parsed`: the rules as yaramod parsed them, or their source text (parsed
    here when splitting is worth it). Without either, or with few rules, one group: `compiled`. Groups
    are compiled with `externals` (and their placeholder rules are left out)."""
    targets = [name for name, docs in wanted.items() if docs]
    if parsed is None or len(targets) < MIN_SPLIT_RULES:
        return [Group(frozenset(targets), compiled)]
    if isinstance(parsed, str):
        try:
            parsed = parse(rule=parsed, externals=externals)
        except Exception:  # yaramod refuses what yara-python compiled: scan with everything
            return [Group(frozenset(targets), compiled)]
    documents = len(set().union(*(wanted[name] for name in targets)))
    broad = [name for name in targets if len(wanted[name]) >= BROAD_SHARE * documents]
    order = {doc: i for i, doc in enumerate(sorted(set().union(*wanted.values())))}
    selective = sorted(set(targets) - set(broad), key=lambda n: (min(order[d] for d in wanted[n]), n))
    parts: list[list[str]] = [broad]
    for start in range(0, len(selective), GROUP_RULES):
        part = selective[start : start + GROUP_RULES]
        union = set().union(*(wanted[name] for name in part))
        if len(union) >= 2 * BROAD_SHARE * documents:
            parts[0].extend(part)  # most files need it anyway: a scan of its own would cost more
        else:
            parts.append(part)
    parts = [part for part in parts if part]
    rules = {rule.name: rule for rule in parsed.rules if rule.name not in (externals or {})}
    names = set(rules)
    needed_by = {name: _references(rule, names) for name, rule in rules.items()}
    always = {name for name, rule in rules.items() if rule.is_global}
    imports = "".join(f'import "{module.name}"\n' for module in parsed.imports)
    groups = []
    for part in parts:
        closure, pending = set(), [*part, *always]
        while pending:
            name = pending.pop()
            if name not in closure:
                closure.add(name)
                pending.extend(needed_by.get(name, ()))
        text = imports + "\n".join(rule.text for name, rule in rules.items() if name in closure)
        try:
            groups.append(Group(frozenset(part), yara.compile(source=text, externals=dict(externals or {}))))
        except (yara.Error, ValueError):  # yaramod's text of a rule yara refuses: scan with everything
            groups.append(Group(frozenset(part), compiled))
    return groups


def needs_paths(policy: Policy) -> None:
    """Verification reads the candidates' files: the forest must record their paths."""
    if not policy.store_path:
        raise PolicyError("--verify needs stored paths: the forest was initialised without --store-path")


def collect(
    stream: SearchStream,
    policy: Policy,
    verify_them: bool,
    progress: Progress,
    started: float,
    details: Collection[str] = (),
) -> SearchResult:
    """A search stream's results, gathered; with `verify_them`, every candidate scanned with YARA (and
    the `details` of each match kept: results.MATCH_DETAILS)."""
    unknown = set(details) - set(MATCH_DETAILS)
    if unknown:
        raise ValueError(f"unknown match details {sorted(unknown)}: choose from {list(MATCH_DETAILS)}")
    if details and not verify_them:
        raise ValueError("match details come from verification: search with verify=True")
    if verify_them:
        needs_paths(policy)
    result = stream.collect()
    if verify_them:
        verify(
            result,
            stream.compiled,
            policy,
            stream.parsed,
            progress=progress,
            externals=stream.externals,
            details=details,
        )
    result.timings_ms["total"] = (time.perf_counter() - started) * 1000
    return result


def verify(
    result: SearchResult,
    rules: yara.Rules,
    policy: Policy,
    parsed: yaramod.YaraFile | str | None = None,
    workers: int = 0,
    progress: Progress = SILENT,
    externals: Externals | None = None,
    details: Collection[str] = (),
) -> VerifyStats:
    """Fill in `verified` (or `skipped` with its reason) of every candidate of `result`; `parsed` (the
    rules as yaramod parsed them) lets each file be scanned with the groups of its own rules only."""
    started = time.perf_counter()
    documents: dict[bytes, _Document] = {}
    wanted: dict[str, set[bytes]] = {}
    for rule in result.rules:
        wanted[rule.name] = {c.source_id for c in rule.candidates}
        for candidate in rule.candidates:
            documents.setdefault(candidate.source_id, _Document(candidate.paths)).rules.add(rule.name)
    groups = rule_groups(wanted, rules, parsed, externals)
    stats = VerifyStats(groups=len(groups))
    workers = workers or min(4, len(os.sched_getaffinity(0)))

    def run(source_id: bytes, doc: _Document) -> Verdict:
        needed = [g for g in groups if not g.names.isdisjoint(doc.rules)]
        return scan_document(doc.paths, source_id, needed, policy, details)

    verdicts: dict[bytes, Verdict] = {}
    with (
        progress.stage("verifying", len(documents), "file") as stage,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-verify") as pool,
    ):
        jobs = {pool.submit(run, source_id, doc): source_id for source_id, doc in documents.items()}
        for future, source_id in jobs.items():
            verdict = verdicts[source_id] = future.result()
            if not verdict.skipped:
                stats.files += 1
                stats.bytes += verdict.size
                stats.scans += verdict.scans
            stage.advance()
    for rule in result.rules:
        for candidate in rule.candidates:
            verdict = verdicts[candidate.source_id]
            if verdict.skipped:
                candidate.verified, candidate.skipped = None, verdict.skipped
                candidate.skip_detail = verdict.detail
            else:
                candidate.verified = rule.name in verdict.matched
                candidate.details = verdict.details.get(rule.name) if candidate.verified else None
    stats.seconds = time.perf_counter() - started
    result.timings_ms["verify"] = stats.seconds * 1000
    result.verification = stats.to_json()
    return stats
