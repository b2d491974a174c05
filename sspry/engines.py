"""The YARA engines verification can scan with: yara-python (libyara) and yara-x (VirusTotal's rewrite).

One face for both: `compile_group` (source text and external variables -> native rules), `serialize` /
`deserialize` (to hand rules to worker processes), and `scan_document` (read a candidate's file once,
check it is still the content that was indexed, scan it with some compiled groups, keep what was
asked of each match). yara-python releases the GIL while it scans, so its scans run on threads;
yara-x's binding holds it, so verification with yara-x runs in worker processes (`init_worker` /
`scan_in_worker`). yara-x refuses a few rules yara-python compiles (it type-checks harder): those are
compiled with yara-python instead, by `compile_group`'s caller (it returns their names).

Kept free of yaramod and the planner, so a worker process starts fast.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import yara

from sspry.document import paired_stamps, unchanged
from sspry.policy import Policy

ENGINES = ("yara", "yara-x")
DEFAULT_ENGINE = "yara"  # see docs/architecture.md (Verification): measured on Yara-Rules
IN_MEMORY_BYTES = 256 << 20  # larger files are hashed in blocks and scanned from their path
SCAN_TIMEOUT_S = 120
MATCH_DATA_BYTES = 64  # of each matched string shown (`--print-strings`)
MATCHES_PER_RULE = 256  # string matches reported per rule and file; more is said with matches_truncated
_ERROR_LINE = re.compile(r"-->\s*line:(\d+):")


class EngineError(Exception):
    """An engine that is not installed, or rules it refuses as a whole."""


@dataclass(frozen=True)
class Verdict:
    matched: frozenset[str] = frozenset()
    details: dict[str, dict] = field(default_factory=dict)  # rule -> what was asked of its match
    skipped: str | None = None  # a results.SKIP_REASONS code
    detail: str | None = None
    size: int = 0  # bytes read and scanned
    scans: int = 0  # rule groups it was scanned with
    hashed: bool = False  # its stamp did not hold: it was hashed to check it still holds the document


def qualified_name(namespace: str, rule: str) -> str:
    """A rule's name when more than one namespace is searched (YARA's own `namespace:rule`): what
    results and scans call it (RuleSource.qualify, Compiled.name)."""
    return f"{namespace}:{rule}"


@dataclass(frozen=True)
class Compiled:
    """Native rules of one engine."""

    engine: str
    rules: object  # yara.Rules or yara_x.Rules
    qualified: bool = False  # matches are named `namespace:rule` (several namespaces searched)

    def name(self, namespace: str, rule: str) -> str:
        return qualified_name(namespace, rule) if self.qualified else rule


def _yara_x():
    try:
        import yara_x
    except ImportError as exc:  # a dependency: only a broken install lacks it
        raise EngineError("the yara-x engine needs the yara-x package (pip install yara-x)") from exc
    return yara_x


Unit = tuple[str, str, list[tuple[str, str]]]  # (namespace, imports text, [(rule name, rule text)])


def _numbered(imports: str, rules: list[tuple[str, str]]) -> tuple[str, list[tuple[int, str]]]:
    """A unit's source text, and the line each of its rules starts on."""
    pieces, starts, line = [imports], [], imports.count("\n") + 1
    for name, body in rules:
        starts.append((line, name))
        pieces.append(body + "\n")
        line += body.count("\n") + 1
    return "".join(pieces), starts


def compile_group(
    engine: str, units: list[Unit], externals: Mapping | None, qualified: bool = False
) -> tuple[Compiled | None, list[tuple[str, str]]]:
    """`units` (each a namespace's imports and rules, in order, with everything they reference)
    compiled by `engine` into one set, each unit in its namespace: (the compiled rules or None when
    none compiled, the (namespace, rule) pairs it refused). yara-python refuses nothing here (it
    compiled every namespace before); yara-x may refuse a rule, which is then left out and named, its
    error located by line. `qualified`: matches are named `namespace:rule` (RuleSource.qualify)."""
    externals = dict(externals or {})
    if engine == "yara":
        sources = {ns: imports + "\n".join(text for _, text in rules) for ns, imports, rules in units}
        return Compiled("yara", yara.compile(sources=sources, externals=externals), qualified), []
    yara_x = _yara_x()
    kept = {ns: (imports, list(rules)) for ns, imports, rules in units}
    refused: list[tuple[str, str]] = []
    while any(rules for _, rules in kept.values()):
        compiler = _x_compiler(externals)
        for ns, (imports, rules) in kept.items():
            if not rules:
                continue
            text, starts = _numbered(imports, rules)
            compiler.new_namespace(ns)
            try:
                compiler.add_source(text)
            except yara_x.CompileError as exc:
                found = _ERROR_LINE.search(str(exc))
                if found is None:  # not located: the whole unit goes
                    culprits = {name for _, name in starts}
                else:
                    line = int(found.group(1))
                    culprits = {max((s for s in starts if s[0] <= line), default=starts[0])[1]}
                refused.extend((ns, name) for name in culprits)
                kept[ns] = (imports, [(n, t) for n, t in rules if n not in culprits])
                break
        else:
            return Compiled("yara-x", compiler.build(), qualified), refused
    return None, refused


def _x_compiler(externals: Mapping | None):
    """A yara-x compiler as sspry uses one: YARA's regex syntax accepted, the external variables
    declared with their values."""
    compiler = _yara_x().Compiler(relaxed_re_syntax=True)
    for name, value in (externals or {}).items():
        compiler.define_global(name, value)
    return compiler


def compile_files(engine: str, files: Mapping[str, str], externals: Mapping | None) -> Compiled:
    """Rule files compiled by `engine` into one set, each in its namespace (`files`: namespace -> path;
    a file alone is in "default"), includes relative to each file; matches are named `namespace:rule`
    when there are several. RuleError (yara-python) or EngineError (yara-x) naming the file refused."""
    if engine == "yara":
        from sspry.query.rules import RuleError, explain, needs_yara_x

        try:
            rules = yara.compile(filepaths=dict(files), externals=dict(externals or {}))
        except yara.Error as exc:
            hint = next(
                (f" ({p} needs yara-x: --engine yara-x)" for p in files.values() if needs_yara_x(p)), ""
            )
            raise RuleError(f"invalid YARA rule: {explain(exc)}{hint}") from exc
        return Compiled("yara", rules, len(files) > 1)
    return compile_x_files(files, externals)


def compile_x_files(files: Mapping[str, str], externals: Mapping | None) -> Compiled:
    """`compile_files` by yara-x."""
    return compile_x_sources({namespace: (None, path) for namespace, path in files.items()}, externals)


def compile_x_sources(
    sources: Mapping[str, tuple[str | None, str | None]], externals: Mapping | None, includes: bool = True
) -> Compiled:
    """Rules compiled by yara-x into one set, each in its namespace (`sources`: namespace -> (text,
    path): the text, else the file at path, includes relative to the file); matches are named
    `namespace:rule` when there are several. EngineError naming the file (or namespace) refused."""
    yara_x = _yara_x()
    compiler = _x_compiler(externals)
    compiler.enable_includes(includes)
    for namespace, (text, path) in sources.items():
        origin = path or namespace
        compiler.new_namespace(namespace)
        if path is not None:
            compiler.add_include_dir(os.path.dirname(os.path.abspath(path)))
        try:
            if text is None:
                with open(path, encoding="utf-8", errors="replace") as handle:  # type: ignore[arg-type]
                    text = handle.read()
            compiler.add_source(text, origin=origin)
        except OSError as exc:
            raise EngineError(f"{origin}: {exc.strerror or exc}") from exc
        except yara_x.CompileError as exc:
            first = str(exc).strip().splitlines()
            raise EngineError(
                f"yara-x refuses {origin}: {' '.join(line.strip() for line in first[:2])}"
            ) from exc
    return Compiled("yara-x", compiler.build(), len(sources) > 1)


def serialize(compiled: Compiled) -> tuple[str, bool, bytes]:
    out = io.BytesIO()
    if compiled.engine == "yara":
        compiled.rules.save(file=out)  # type: ignore[attr-defined]
    else:
        compiled.rules.serialize_into(out)  # type: ignore[attr-defined]
    return compiled.engine, compiled.qualified, out.getvalue()


def deserialize(engine: str, qualified: bool, blob: bytes) -> Compiled:
    if engine == "yara":
        return Compiled("yara", yara.load(file=io.BytesIO(blob)), qualified)
    return Compiled("yara-x", _yara_x().Rules.deserialize_from(io.BytesIO(blob)), qualified)


def shown(data: bytes) -> str:
    """Matched bytes as text: printable ASCII as it is, anything else (and backslash, quote) as \\xNN."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in data)


def _details(tags, meta: dict, found: list[tuple[int, str, bytes]], asked: Collection[str]) -> dict:
    """What `asked` (results.MATCH_DETAILS) wants of one rule's match: its tags, its meta, its string
    matches (identifier, offset, the first MATCH_DATA_BYTES of the data; at most MATCHES_PER_RULE, in
    offset order)."""
    out: dict = {}
    if "tags" in asked:
        out["tags"] = list(tags)
    if "meta" in asked:
        out["meta"] = meta
    if "strings" in asked:
        found = sorted(found)
        out["matches"] = [
            {"identifier": name, "offset": offset, "data": shown(data[:MATCH_DATA_BYTES])}
            for offset, name, data in found[:MATCHES_PER_RULE]
        ]
        if len(found) > MATCHES_PER_RULE:
            out["matches_truncated"] = True
    return out


def match_details(match: yara.Match, asked: Collection[str]) -> dict:
    """`_details` of a yara-python match."""
    found = [(i.offset, s.identifier, i.matched_data) for s in match.strings for i in s.instances]
    return _details(match.tags, dict(match.meta), found, asked)


def _slice(data: bytes | None, path: str, offset: int, length: int) -> bytes:
    length = min(length, MATCH_DATA_BYTES)
    if data is not None:
        return data[offset : offset + length]
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def scan_group(
    compiled: Compiled,
    path: str,
    data: bytes | None,
    asked: Collection[str],
    externals: Mapping,
    timeout: int = SCAN_TIMEOUT_S,
) -> dict[str, dict]:
    """rule -> its details, for every rule of the group that matched `data` (None: the file at `path`).
    Raises the engine's errors (`scan_errors()`).

    yara-python scans in libyara's fast mode unless string matches are asked for: it stops looking for
    a string once it has one match, unless a condition uses its count, offsets or lengths (libyara
    decides which, per string, when it compiles), so which rules match is the same. On Yara-Rules'
    utils/ (a regex that matches nearly every byte) it is 9x faster and keeps no match lists."""
    if compiled.engine == "yara":
        fast = "strings" not in asked
        found = (
            compiled.rules.match(data=data, timeout=timeout, fast=fast)  # type: ignore[attr-defined]
            if data is not None
            else compiled.rules.match(path, timeout=timeout, fast=fast)  # type: ignore[attr-defined]
        )
        return {compiled.name(m.namespace, m.rule): match_details(m, asked) if asked else {} for m in found}
    scanner = _yara_x().Scanner(compiled.rules)
    scanner.set_timeout(timeout)
    for name, value in externals.items():
        scanner.set_global(name, value)
    results = scanner.scan(data) if data is not None else scanner.scan_file(path)
    out = {}
    for rule in results.matching_rules:
        found = []
        if "strings" in asked:
            found = [
                (m.offset, p.identifier, _slice(data, path, m.offset, m.length))
                for p in rule.patterns
                for m in p.matches
            ]
        name = compiled.name(rule.namespace, rule.identifier)
        out[name] = _details(rule.tags, dict(rule.metadata), found, asked) if asked else {}
    return out


def _errors(libyara: type[BaseException], yara_x_name: str) -> tuple[type[BaseException], ...]:
    """An error class of yara-python and its yara-x counterpart (when yara-x is installed)."""
    try:
        import yara_x
    except ImportError:
        return (libyara,)
    return (libyara, getattr(yara_x, yara_x_name))


def scan_errors() -> tuple[type[BaseException], ...]:
    """What a scan by either engine raises when it fails on a file."""
    return _errors(yara.Error, "ScanError")


def _read(
    path: str, source_id: bytes, policy: Policy, stamp: tuple[int, int]
) -> tuple[bytes | None, Verdict | None, int, bool]:
    """(the file's bytes (None: scan it by path) or why it cannot be verified, its size, whether it was
    hashed). A file that still has the `stamp` recorded when it was indexed holds that document
    (document.unchanged) and is scanned by path, unread here; any other is hashed, and scanned only if
    it still holds the document."""
    try:
        with open(path, "rb") as handle:  # opened either way: an unreadable file is reported as such
            info = os.fstat(handle.fileno())
            size = info.st_size
            if unchanged(stamp, size, info.st_mtime_ns):
                return None, None, size, False
            hasher = policy.new_id_hasher()
            data = None
            if size <= IN_MEMORY_BYTES:
                data = handle.read()
                hasher.update(data)
            else:
                for block in iter(lambda: handle.read(16 << 20), b""):
                    hasher.update(block)
    except FileNotFoundError:
        return None, Verdict(skipped="missing", detail=f"{path}: file no longer exists"), 0, False
    except OSError as exc:
        return None, Verdict(skipped="unreadable", detail=f"{path}: {exc.strerror or exc}"), 0, False
    if hasher.digest() != source_id:
        changed = Verdict(skipped="changed", detail=f"{path}: file changed since it was indexed")
        return None, changed, 0, True
    return data, None, size, True


def _scan(
    path: str,
    data: bytes | None,
    size: int,
    groups: list[Compiled],
    asked: Collection[str],
    externals,
    hashed: bool,
) -> Verdict:
    details: dict[str, dict] = {}
    try:
        for group in groups:
            details.update(scan_group(group, path, data, asked, externals))
    except _errors(yara.TimeoutError, "TimeoutError"):
        return Verdict(skipped="timeout", detail=f"{path}: YARA took longer than {SCAN_TIMEOUT_S} s")
    except scan_errors() as exc:
        return Verdict(skipped="error", detail=f"{path}: yara: {exc}")
    kept = {rule: found for rule, found in details.items() if found} if asked else {}
    return Verdict(matched=frozenset(details), details=kept, size=size, scans=len(groups), hashed=hashed)


def scan_document(
    paths: tuple[str, ...],
    source_id: bytes,
    groups: list[Compiled],
    policy: Policy,
    asked: Collection[str] = (),
    externals: Mapping | None = None,
    stamps: tuple[tuple[int, int], ...] = (),
) -> Verdict:
    """Scan the first of `paths` that still holds the document with `groups`; otherwise report the first
    path's problem. `asked`: the match details wanted (results.MATCH_DETAILS); `stamps`: each path's
    (size, mtime_ns) when it was indexed, when known."""
    if not paths:
        why = "no recorded path" if policy.store_path else "the forest was initialised without --store-path"
        return Verdict(skipped="no-path", detail=why)
    first: Verdict | None = None
    for path, stamp in zip(paths, paired_stamps(paths, stamps), strict=True):
        data, problem, size, hashed = _read(path, source_id, policy, stamp)
        if problem is None:
            return _scan(path, data, size, groups, asked, externals or {}, hashed)
        first = first or problem
    assert first is not None
    return first


# --- worker processes (yara-x) ---------------------------------------------------------------------
_WORKER: dict = {}


def init_worker(
    blobs: list[tuple[str, bool, bytes]], policy: Policy, asked: tuple[str, ...], externals: dict
) -> None:
    """A verification worker's state: the groups, deserialized once."""
    _WORKER.update(
        groups=[deserialize(*blob) for blob in blobs],
        policy=policy,
        asked=asked,
        externals=externals,
    )


def scan_in_worker(
    paths: tuple[str, ...], source_id: bytes, indexes: list[int], stamps: tuple[tuple[int, int], ...] = ()
) -> Verdict:
    groups = [_WORKER["groups"][i] for i in indexes]
    return scan_document(
        paths, source_id, groups, _WORKER["policy"], _WORKER["asked"], _WORKER["externals"], stamps
    )
