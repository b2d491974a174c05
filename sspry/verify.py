"""YARA verification of candidates over their recorded paths, with yara-python or yara-x (engines.py).

Each candidate document is scanned once, from the first of its paths that still holds its content. A
path that still has the size and mtime recorded when it was indexed holds it, as re-indexing judges
(document.unchanged): it is scanned by path, unread and unhashed (on Yara-Rules' antidebug_antivm/, 2,911
files, hashing them was a sixth of verification). Any other path is hashed and its Source ID compared,
so a file that changed or vanished since it was indexed is skipped (with its reason) instead of being
called a match.

A file is scanned only with rules it is a candidate for, as far as that pays: the rules of a bundle are
split into groups, each compiled on its own (from yaramod's text of its rules, with the imports, global
rules and every rule they reference), and a file is scanned with the groups holding one of its rules.
A rule without candidates is in no group, however few rules there are: compiling a group costs
milliseconds, while one idle rule can cost more than all the others (maldocs/ of Yara-Rules: a regex
rule no file was a candidate for made 3/4 of its verification when small sets were scanned with their
source's whole compilation).
Every scan of a file costs libyara a pass over its bytes, and for rules with good atoms that pass, not
the rules, is most of the cost: over 400 candidate files of Yara-Rules' malware/, a group of 110 rules
and one of 64 each took about 4 ms a file. So such rules share one group, and a file is read by it
once. A rule with a string YARA has no good atom for (fewer than 3 fixed bytes in a row: a regex over
a character class, hex with a wildcard every other byte) costs YARA time per byte of every file it is
scanned over (`Big_Numbers`' regex: 1.4 s over 40 MB, a rule of plain strings under 0.05 s): unless it
is broad (a candidate for much of what is verified) it is scanned over its own candidates only, in a
group of the rules with exactly its candidates. (Before, selective rules went in groups of 64 whose
candidates overlapped: malware/ needed 851 group scans for those 400 files and 5.5 s, now 594 and
3.6 s; the whole of Yara-Rules 2.11 s against 1.79 s over 150 files.)
libyara runs every imported module on every file it scans (pe: about 0.3 ms a small file), so a group
imports only the modules its rules name, and its rules that name none are also compiled without any
import, for the files only they are candidates for (`Group.plain`).
yara-python scans run on a thread pool (it releases the GIL while it scans, hashlib while it hashes);
yara-x holds the GIL, so its scans run in worker processes that load the compiled groups once.
A rule yara-x refuses is verified with yara-python.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from array import array
from collections.abc import Collection, Hashable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace

import yara
import yaramod

from sspry.engines import (
    DEFAULT_ENGINE,
    ENGINES,
    Compiled,
    Verdict,
    compile_group,
    init_worker,
    scan_document,
    scan_in_worker,
    serialize,
)
from sspry.policy import Policy, PolicyError
from sspry.progress import SILENT, Progress
from sspry.query.externals import Externals
from sspry.query.results import MATCH_DETAILS, Candidate, RuleResult, SearchResult, SearchStream
from sspry.query.rules import RELEASE_PARSE_CHARS, Namespace, RuleSource, parse, release_parser
from sspry.query.strings import atom_bytes

BROAD_SHARE = 0.25  # a rule that is a candidate for this share of the verified files is broad
MIN_PROCESS_FILES = 8  # fewer files than this are scanned here, whatever the engine
MIN_ATOM = 3  # fixed bytes in a row a string needs for YARA to find it by a good atom


@dataclass(frozen=True)
class Group:
    """Rules compiled together, and the target rules among them this verification asks about; when
    some of them use a module and others do not, those others also compiled without any import
    (`plain`), for the files none of the group's module rules is a candidate for."""

    names: frozenset[str]
    compiled: Compiled
    plain: Compiled | None = None
    plain_names: frozenset[str] = frozenset()

    def plain_covers(self, name: str) -> bool:
        """Whether `plain` holds the rule: a file is scanned with `plain` when it holds every rule of the
        group the file is a candidate for."""
        return self.plain is not None and name in self.plain_names


@dataclass
class VerifyStats:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    groups: int = 0
    scans: int = 0  # (file, group) scans
    hashed: int = 0  # files whose stamp did not hold, hashed to check they hold their document
    engine: str = DEFAULT_ENGINE

    def to_json(self) -> dict:
        per_s = self.seconds or 1e-9
        return {
            "files": self.files,
            "bytes": self.bytes,
            "mb_per_s": round(self.bytes / 1e6 / per_s, 2),
            "files_per_s": round(self.files / per_s, 1),
            "engine": self.engine,
            "rule_groups": self.groups,
            "group_scans": self.scans,
            "hashed_files": self.hashed,
        }


def _references(rule: yaramod.Rule, names: set[str]) -> set[str]:
    """The rules and modules (of `names`) a rule's condition names."""
    found: set[str] = set()

    class Names(yaramod.ObservingVisitor):
        def visit_IdExpression(self, expr) -> None:
            if expr.symbol.name in names:
                found.add(expr.symbol.name)

    Names().observe(rule.condition)
    return found


def _parts(wanted: Mapping[str, Collection[Hashable]], targets: list[str], slow: set[str]) -> list[list[str]]:
    """The target rules split into groups: all in one, except the selective `slow` ones (a string
    without a good atom), which are grouped by their exact candidate sets (see the module docstring)."""
    documents = len(set().union(*(wanted[name] for name in targets)))
    shared: list[str] = []
    apart: dict[frozenset[Hashable], list[str]] = {}
    for name in targets:
        if name in slow and len(wanted[name]) < BROAD_SHARE * documents:
            apart.setdefault(frozenset(wanted[name]), []).append(name)
        else:
            shared.append(name)
    return [part for part in (shared, *apart.values()) if part]


@dataclass
class _Parsed:
    """One namespace's rules as yaramod parsed them: what a group needs to compile some of them."""

    texts: dict[str, str]  # rule -> its text, in file order
    needed_by: dict[str, set[str]]  # rule -> the rules and modules its condition names
    always: set[str]  # the global rules (every group of the namespace needs them)
    modules: tuple[str, ...]  # the namespace's imports, in order
    slow: set[str]  # rules with a string YARA has no good atom for (strings.atom_bytes < MIN_ATOM)

    @classmethod
    def of(cls, namespace: Namespace, externals: Externals, wanted: Collection[str] = ()) -> _Parsed | None:
        """None when yaramod cannot parse it (its rules are then scanned with its whole compilation);
        which rules are slow is judged for the `wanted` ones only (the rules verification will scan)."""
        parsed = namespace.parsed
        if parsed is None and namespace.text is not None:
            try:
                parsed = parse(rule=namespace.text, externals=externals)
            except Exception:  # yaramod refuses what yara-python compiled
                return None
        if parsed is None:
            return None
        rules = {rule.name: rule for rule in parsed.rules if rule.name not in externals}
        modules = tuple(module.name for module in parsed.imports)
        names = set(rules) | set(modules)
        found = cls(
            {name: rule.text for name, rule in rules.items()},
            {name: _references(rule, names) for name, rule in rules.items()},
            {name for name, rule in rules.items() if rule.is_global},
            modules,
            {
                name
                for name in wanted
                if name in rules and any(atom_bytes(s) < MIN_ATOM for s in rules[name].strings)
            },
        )
        if namespace.parsed is None and len(namespace.text or "") >= RELEASE_PARSE_CHARS:
            rules = parsed = None  # type: ignore[assignment]  # the parse's last references
            release_parser()  # before the groups are compiled: never both in memory
        return found

    def closure(self, rules: Collection[str]) -> tuple[str, list[tuple[str, str]]]:
        """The imports and the (name, text) of `rules`, the global rules and every rule they reference,
        in file order. Only the modules those rules name are imported: YARA parses a file with every
        imported module (pe: about 0.3 ms a small file), and a module a rule names but is not imported
        would fail the compilation, never change a verdict."""
        found = self._needed(rules)
        imports = "".join(f'import "{module}"\n' for module in self.modules if module in found)
        return imports, [(name, text) for name, text in self.texts.items() if name in found]

    def uses_modules(self, rule: str) -> bool:
        """Whether the rule, or a rule it needs (the global rules included), names a module."""
        return not self._needed([rule]).isdisjoint(self.modules)

    def _needed(self, rules: Collection[str]) -> set[str]:
        """`rules`, the global rules, and every rule and module they name, transitively."""
        found, pending = set(), [*rules, *self.always]
        while pending:
            name = pending.pop()
            if name not in found:
                found.add(name)
                pending.extend(self.needed_by.get(name, ()))
        return found


def rule_groups(
    wanted: Mapping[str, Collection[Hashable]], source: RuleSource, engine: str = DEFAULT_ENGINE
) -> list[Group]:
    """Split the target rules with candidates (`wanted`: a name of `source.targets` -> its candidate
    documents) into groups (see the module docstring), each compiled by `engine` with the source's
    externals (their placeholder rules left out); a group may hold rules of several namespaces, each
    compiled in its own. Targets the engine refuses form a yara-python group of their own; the targets
    of a namespace yaramod cannot parse are scanned with yara-python's compilation of every namespace,
    those of namespaces only yara-x compiles (rules.judged) with yara-x's of them, whatever `engine`."""
    found = [name for name, docs in wanted.items() if docs]
    targets = [name for name in found if source.locate[name][0].engine == "yara"]
    only_x = [name for name in found if source.locate[name][0].engine != "yara"]  # only yara-x compiles
    x_groups = [Group(frozenset(only_x), source.compiled_x)] if only_x else []
    externals = dict(source.externals)
    qualified = len(source.namespaces) > 1
    by_namespace: dict[str, list[str]] = {}
    for name in targets:
        by_namespace.setdefault(source.locate[name][0].name, []).append(name)
    namespaces = {ns.name: ns for ns in source.namespaces}

    def whole(names: list[str]) -> list[Group]:
        """`names` scanned with yara-python's compilation of every namespace."""
        return [Group(frozenset(names), Compiled("yara", source.compiled, qualified))] if names else []

    parsed = {
        ns: _Parsed.of(namespaces[ns], externals, {source.locate[name][1] for name in names})
        for ns, names in by_namespace.items()
    }
    splittable = [name for name in targets if parsed[source.locate[name][0].name] is not None]
    groups = whole([name for name in targets if parsed[source.locate[name][0].name] is None])

    def build(part: list[str], engine: str) -> tuple[Compiled | None, list[str]]:
        """The part's rules compiled, and those refused (the whole part when a global rule is)."""
        own: dict[str, list[str]] = {}
        for name in part:
            namespace, rule = source.locate[name]
            own.setdefault(namespace.name, []).append(rule)
        units = [(ns, *parsed[ns].closure(rules)) for ns, rules in own.items()]  # type: ignore[union-attr]
        try:
            group, failed = compile_group(engine, units, externals, qualified)
        except (yara.Error, ValueError):  # yaramod's text of a rule yara refuses
            return None, list(part)
        if any(rule in parsed[ns].always for ns, rule in failed):  # type: ignore[union-attr]
            return None, list(part)  # without a global rule the others would match where YARA does not
        failed_names = {source.qualify(ns, rule) for ns, rule in failed}
        return group, [name for name in part if name in failed_names]

    def uses_modules(name: str) -> bool:
        namespace, rule = source.locate[name]
        return parsed[namespace.name].uses_modules(rule)  # type: ignore[union-attr]

    refused = []
    slow = {
        source.qualify(ns, rule) for ns, found in parsed.items() if found is not None for rule in found.slow
    }
    for part in _parts(wanted, splittable, slow) if splittable else []:
        group, failed = build(part, engine)
        refused.extend(failed)
        kept = [name for name in part if name not in failed]
        if group is not None and kept:
            groups.append(_with_plain(Group(frozenset(kept), group), engine, build, uses_modules))
    if refused:
        group, _ = build(refused, "yara") if engine != "yara" else (None, refused)
        groups += [Group(frozenset(refused), group)] if group is not None else whole(refused)
    return groups + x_groups


def _with_plain(group: Group, engine: str, build, uses_modules) -> Group:
    """The group with its rules that use no module (`uses_modules`) also compiled apart (`build`), when
    it has both kinds."""
    plain = [name for name in group.names if not uses_modules(name)]
    if not plain or len(plain) == len(group.names):
        return group
    compiled, failed = build(sorted(plain), engine)
    if compiled is None or failed:
        return group  # as compiled with the modules: still right, only slower
    return replace(group, plain=compiled, plain_names=frozenset(plain))


def needs_paths(policy: Policy) -> None:
    """Verification reads the candidates' files: the forest must record their paths."""
    if not policy.store_path:
        raise PolicyError("--verify needs stored paths: the forest was initialised without --store-path")


def check_options(verify_them: bool, details: Collection[str], engine: str) -> None:
    """ValueError for verification options that cannot be honoured: before any work."""
    unknown = set(details) - set(MATCH_DETAILS)
    if unknown:
        raise ValueError(f"unknown match details {sorted(unknown)}: choose from {list(MATCH_DETAILS)}")
    if details and not verify_them:
        raise ValueError("match details come from verification: search with verify=True")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose from {list(ENGINES)}")


def collect(
    stream: SearchStream,
    policy: Policy,
    verify_them: bool,
    progress: Progress,
    started: float,
    details: Collection[str] = (),
    engine: str = DEFAULT_ENGINE,
) -> SearchResult:
    """A search stream's results, gathered; with `verify_them`, every candidate scanned by `engine` (and
    the `details` of each match kept: results.MATCH_DETAILS). The options were checked (check_options)
    before the search. While verifying, a rule's candidates are held as indices into one table of
    documents (`_Table`), and made Candidates again once the files are scanned."""
    if not verify_them:
        result = stream.collect()
    else:
        needs_paths(policy)
        assert stream.source is not None  # set by whatever made the stream
        table, rules = _Table(), []
        for rule in stream:
            table.add(rule)
            rule.candidates = []
            rules.append(rule)
        result = SearchResult(rules, stream.documents, stream.timings_ms, stream.servers, stream.offline)
        verdicts, _ = _verify_table(result, table, stream.source, policy, 0, progress, details, engine)
        for rule in rules:
            rule.candidates = [
                _judged(_copy(table.documents[at]), rule.name, verdicts[at]) for at in table.rows[rule.name]
            ]
    result.timings_ms["total"] = (time.perf_counter() - started) * 1000
    return result


class _Table:
    """The candidate documents of a search, each once (the first Candidate met of it: Source ID, paths,
    stamps), and per rule its candidates as indices into them, in its order: 4 bytes a (rule, document)
    pair while the files are scanned, where a Candidate and the sets that grouped rules cost about 250
    (Yara-Rules over 13,806 documents: 852,552 pairs, 214 MB)."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.documents: list[Candidate] = []
        self.rows: dict[str, array] = {}

    def add(self, rule: RuleResult) -> None:
        row = array("i")
        for candidate in rule.candidates:
            at = self.index.get(candidate.source_id)
            if at is None:
                at = self.index[candidate.source_id] = len(self.documents)
                self.documents.append(candidate)
            row.append(at)
        self.rows[rule.name] = row


def _copy(document: Candidate) -> Candidate:
    """A new Candidate of the document, unverified."""
    return Candidate(document.source_id, document.paths, document.path_count, document.stamps)


def _judged(candidate: Candidate, rule: str, verdict: Verdict) -> Candidate:
    """The candidate of `rule` with the verdict of its document's scan filled in."""
    if verdict.skipped:
        candidate.verified, candidate.skipped = None, verdict.skipped
        candidate.skip_detail = verdict.detail
    else:
        candidate.verified = rule in verdict.matched
        candidate.details = verdict.details.get(rule) if candidate.verified else None
    return candidate


def _pool(scanners: list[Compiled], files: int, workers: int, policy: Policy, details, externals) -> Executor:
    """Threads for yara-python; worker processes (spawned: a client may hold gRPC threads, which a fork
    would copy mid-flight), each loading the compiled groups once, when one is yara-x's and there are
    files enough to pay for starting them."""
    if files < MIN_PROCESS_FILES or all(c.engine == "yara" for c in scanners):
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-verify")
    blobs = [serialize(c) for c in scanners]
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(blobs, policy, tuple(details), dict(externals or {})),
    )


def verify(
    result: SearchResult,
    source: RuleSource,
    policy: Policy,
    workers: int = 0,
    progress: Progress = SILENT,
    details: Collection[str] = (),
    engine: str = DEFAULT_ENGINE,
) -> VerifyStats:
    """Fill in `verified` (or `skipped` with its reason) of every candidate of `result` (a search of
    `source`), scanning with `engine` each file with the groups of its own rules only."""
    table = _Table()
    for rule in result.rules:
        table.add(rule)
    verdicts, stats = _verify_table(result, table, source, policy, workers, progress, details, engine)
    for rule in result.rules:
        for candidate, at in zip(rule.candidates, table.rows[rule.name], strict=True):
            _judged(candidate, rule.name, verdicts[at])
    return stats


def _verify_table(
    result: SearchResult,
    table: _Table,
    source: RuleSource,
    policy: Policy,
    workers: int,
    progress: Progress,
    details: Collection[str],
    engine: str,
) -> tuple[list[Verdict], VerifyStats]:
    """The verdict of each document of `table`, scanned with the groups of its rules, and what that
    took (also put in `result`: verification, timings)."""
    started = time.perf_counter()
    groups = rule_groups(table.rows, source, engine)
    externals = source.externals
    stats = VerifyStats(groups=len(groups), engine=engine)
    workers = workers or min(4, len(os.sched_getaffinity(0)))
    scanners = [g.compiled for g in groups]  # then each group's plain compilation, if it has one
    plain_at: dict[int, int] = {}
    for i, group in enumerate(groups):
        if group.plain is not None:
            plain_at[i] = len(scanners)
            scanners.append(group.plain)
    needed = _scanners_of(groups, table, plain_at)
    pool = _pool(scanners, len(table.documents), workers, policy, details, externals)
    in_processes = isinstance(pool, ProcessPoolExecutor)

    def submit(document: Candidate, chosen: list[int]):
        if in_processes:
            return pool.submit(scan_in_worker, document.paths, document.source_id, chosen, document.stamps)
        return pool.submit(
            scan_document,
            document.paths,
            document.source_id,
            [scanners[i] for i in chosen],
            policy,
            details,
            externals,
            document.stamps,
        )

    verdicts: list[Verdict] = []
    with progress.stage("verifying", len(table.documents), "file") as stage, pool:
        jobs = [submit(document, chosen) for document, chosen in zip(table.documents, needed, strict=True)]
        for future in jobs:
            verdict = future.result()
            verdicts.append(verdict)
            if not verdict.skipped:
                stats.files += 1
                stats.bytes += verdict.size
                stats.scans += verdict.scans
                stats.hashed += verdict.hashed
            stage.advance()
    stats.seconds = time.perf_counter() - started
    result.timings_ms["verify"] = stats.seconds * 1000
    result.verification = stats.to_json()
    return verdicts, stats


def _scanners_of(groups: list[Group], table: _Table, plain_at: dict[int, int]) -> list[list[int]]:
    """Per document of `table`, the scanners to scan it with: each group holding one of its rules, as
    the group's plain compilation (`plain_at`) when that holds all of them (Group.plain_covers)."""
    # per group, a byte per document: 0 no rule of the group, 1 only rules of its plain compilation, 2 any
    marks = [bytearray(len(table.documents)) for _ in groups]
    for i, group in enumerate(groups):
        flags = marks[i]
        for name in group.names:
            mark = 1 if group.plain_covers(name) else 2
            for at in table.rows.get(name, ()):
                if flags[at] < mark:
                    flags[at] = mark
    return [
        [plain_at[i] if flags[at] == 1 else i for i, flags in enumerate(marks) if flags[at]]
        for at in range(len(table.documents))
    ]
