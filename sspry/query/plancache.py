"""Plans cached per rule: in memory (bounded LRU) and, given a directory, on disk in one SQLite file.

A plan is stored under a key that names everything it depends on (see `RuleKeys`): the rule's own text
(its exact bytes and first column, so stored note positions stay exact), the keys of the rules it names
and of its file's global rules (so a changed dependency changes the key: invalidation is exact, never by
time), the file's imports, the policy, `max_anchors`, the stored format and the planner version -- a digest
of the planner's own source, the module definitions yaramod is given and yaramod's version, so a changed
planner never reads an old plan. A plan that used time.now (it depends on when the search runs) is never
stored.

The cache never fails a search: a disk it cannot open, read or write is left alone (the memory part still
works) and a damaged entry is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, replace
from functools import cache, lru_cache
from pathlib import Path

from sspry.policy import Policy
from sspry.query import moduledefs, planformat
from sspry.query.externals import Externals, digest_part
from sspry.query.ruleplan import Note, RulePlan

FILENAME = "plans.sqlite3"
MEMORY_ENTRIES = 20_000  # plans held in memory: all of Yara-Rules (12,774 plans) took about 130 MB
MEMORY_SOURCES = 256  # source texts whose rule keys are held in memory
DISK_ENTRIES = 500_000  # stored plans; the oldest go first beyond this
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
# the modules whose code decides what a plan is
_PLANNER_MODULES = (
    "sspry.features.metadata",
    "sspry.features.runs",
    "sspry.features.xmodules",
    "sspry.query.condition",
    "sspry.query.externals",
    "sspry.query.hexstr",
    "sspry.query.literals",
    "sspry.query.moduledefs",
    "sspry.query.plan",
    "sspry.query.planformat",
    "sspry.query.regex",
    "sspry.query.ruleplan",
    "sspry.query.ruleset",
    "sspry.query.runs",
    "sspry.query.strings",
    "sspry.query.terms",
    "sspry.query.windows",
)


@cache
def planner_version() -> str:
    """A digest of the planner's source, the yaramod module definitions of yara-x's modules and yaramod's
    version: any change to one of them is a new version."""
    digest = hashlib.sha256()
    for name in _PLANNER_MODULES:
        digest.update(name.encode() + b"\0")
        digest.update(Path(importlib.import_module(name).__file__ or "").read_bytes())
    for path in sorted(moduledefs.DEFINITIONS.glob("*.json")):  # what yaramod parses
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(importlib.metadata.version("yaramod").encode())
    return digest.hexdigest()[:32]


def context_digest(policy: Policy, max_anchors: int, externals: Externals | None = None) -> bytes:
    """What every rule's key shares: planner version, stored format, policy, anchor budget and the values
    of external variables."""
    return _context_digest(policy, max_anchors, digest_part(externals))


@lru_cache(maxsize=64)  # computed for every search: 0.1 ms of a 0.8 ms single-rule search
def _context_digest(policy: Policy, max_anchors: int, externals: str) -> bytes:
    context = {
        "planner": planner_version(),
        "format": planformat.FORMAT_VERSION,
        "policy": asdict(policy),
        "max_anchors": max_anchors,
        "externals": externals,
    }
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).digest()


class RuleKeys:
    """The cache key of each rule of one parsed source text.

    key(rule) = sha256(context, imports, the rule's name, first column and exact bytes, and the same for
    every rule of its `closure`, sorted by name): a change to any rule the plan may depend on changes the
    key."""

    def __init__(self, text: str, yara_file, context: bytes):
        self._data = text.encode("utf-8", "surrogatepass")
        self._starts = [0]
        self._starts.extend(m.end() for m in re.finditer(rb"\n", self._data))
        self._rules = {rule.name: rule for rule in yara_file.rules}
        self._globals = [rule.name for rule in yara_file.rules if rule.is_global]
        imports = ",".join(sorted(i.name for i in yara_file.imports)).encode()
        self._context = hashlib.sha256(context + b"\0" + imports).digest()
        self._keys: dict[str, bytes | None] = {}
        self._lines: dict[str, int] = {}
        self._dependencies: dict[str, list[str]] = {}  # the other rules a rule names
        self._own_digests: dict[str, bytes | None] = {}

    def _text(self, name: str) -> tuple[bytes, int, int] | None:
        """(the rule's exact bytes, its first line, its first column), or None if its location does not
        point into this text (a rule from an included file)."""
        rule = self._rules[name]
        try:
            begin, end = rule.token_first.location.begin, rule.token_last.location.end
            if rule.token_first.location.file_path != "[stream]":
                return None
            start = self._starts[begin.line - 1] + begin.column - 1
            stop = self._starts[end.line - 1] + end.column
        except (AttributeError, IndexError):
            return None
        data = self._data[start:stop]
        if not data.endswith(b"}") or name.encode() not in data:
            return None
        return data, begin.line, begin.column

    def _named(self, data: bytes, name: str) -> list[str]:
        """The other rules of the file whose names occur in `data` as identifiers, sorted."""
        found = {m.group().decode() for m in _IDENTIFIER.finditer(data)}
        return sorted(n for n in found if n in self._rules and n != name)

    def line(self, name: str) -> int:
        """The rule's first line (what stored positions are relative to); key(name) first."""
        return self._lines.get(name, 0)

    def _own(self, name: str) -> bytes | None:
        """Digest of the rule's own first column and bytes (None: it cannot be keyed)."""
        if name not in self._own_digests:
            found = self._text(name)
            if found is None:
                self._own_digests[name] = None
            else:
                data, line, column = found
                self._lines[name] = line
                self._dependencies[name] = self._named(data, name)
                own = hashlib.sha256(f"{column}\0".encode() + data).digest()
                self._own_digests[name] = own
        return self._own_digests[name]

    def key(self, name: str) -> bytes | None:
        """The rule's key, or None when it cannot be keyed (then it is never cached)."""
        if name not in self._keys:
            self._keys[name] = self._key(name)
        return self._keys[name]

    def _key(self, name: str) -> bytes | None:
        own = self._own(name)
        if own is None:
            return None
        digest = hashlib.sha256(self._context + b"\0" + name.encode() + b"\0" + own)
        for other in sorted(self.closure(name) - {name}):
            other_digest = self._own(other)
            if other_digest is None:
                return None
            digest.update(b"\0" + other.encode() + b"\0" + other_digest)
        return digest.digest()

    def closure(self, name: str) -> set[str]:
        """The rule and every rule its plan may depend on: the rules it names, theirs in turn, and the
        file's global rules (a name that only appears in text or comments counts too: that can only
        cost a re-plan, never a stale plan; and mentions that form a cycle are harmless)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            item = stack.pop()
            if item not in seen:
                seen.add(item)
                self._own(item)
                stack.extend(self._dependencies.get(item, ()))
                stack.extend(self._globals)
        return seen


def source_key(text: str, context: bytes) -> bytes:
    """The key of a whole source text (what its rules' keys are remembered under)."""
    return hashlib.sha256(context + b"\0" + text.encode("utf-8", "surrogatepass")).digest()


class PlanCache:
    """Rule plans by key: a bounded LRU in memory, and on disk in `directory` (None: memory only).

    Shared by threads. Entries hold plans with positions relative to the rule's first line; `get_many`
    returns fresh RulePlans placed at the rules' current lines. It also remembers, per source text, each
    rule's key and first line (`source`), so a source seen before is not even parsed again."""

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_entries: int = MEMORY_ENTRIES,
        disk_entries: int = DISK_ENTRIES,
    ):
        self.memory_entries = memory_entries
        self.disk_entries = disk_entries
        self._memory: OrderedDict[bytes, RulePlan] = OrderedDict()  # plans placed at line 1
        self._sources: OrderedDict[bytes, dict[str, tuple[bytes, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.disk_error: str | None = None
        self.hits = self.misses = 0
        if directory is not None:
            self._open(Path(directory))

    # --- disk ----------------------------------------------------------------------------------
    def _open(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(directory / FILENAME, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost entry after a power cut is only a miss
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            version = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if version is None or version[0] != str(planformat.FORMAT_VERSION):
                db.execute("DROP TABLE IF EXISTS plans")
                db.execute("DROP TABLE IF EXISTS sources")
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('format', ?)", (str(planformat.FORMAT_VERSION),)
                )
            db.execute("CREATE TABLE IF NOT EXISTS plans (key BLOB PRIMARY KEY, plan BLOB, stored REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS sources (key BLOB PRIMARY KEY, rules BLOB, stored REAL)")
            db.commit()
            self._db = db
        except (OSError, sqlite3.Error) as exc:
            self._disk_failed(exc)

    def _disk_failed(self, exc: Exception) -> None:
        self.disk_error = f"{type(exc).__name__}: {exc}"
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _load(self, keys: list[bytes]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        if self._db is None or not keys:
            return found
        try:
            for at in range(0, len(keys), 500):
                chunk = keys[at : at + 500]
                marks = ",".join("?" * len(chunk))
                found.update(self._db.execute(f"SELECT key, plan FROM plans WHERE key IN ({marks})", chunk))
        except sqlite3.Error as exc:
            self._disk_failed(exc)
        return found

    def _store(self, entries: list[tuple[bytes, bytes]]) -> None:
        if self._db is None or not entries:
            return
        try:
            now = time.time()
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO plans VALUES (?, ?, ?)", [(k, p, now) for k, p in entries]
                )
                (count,) = self._db.execute("SELECT count(*) FROM plans").fetchone()
                if count > self.disk_entries:
                    self._db.execute(
                        "DELETE FROM plans WHERE key IN (SELECT key FROM plans ORDER BY stored LIMIT ?)",
                        (count - self.disk_entries,),
                    )
        except sqlite3.Error as exc:
            self._disk_failed(exc)

    # --- the cache -----------------------------------------------------------------------------
    def get_many(self, wanted: Iterable[tuple[bytes, str, int]]) -> dict[bytes, RulePlan]:
        """Plans found for (key, rule name, rule's first line) triples, by key."""
        wanted = list(wanted)
        found: dict[bytes, RulePlan] = {}
        missing: list[tuple[bytes, str, int]] = []
        with self._lock:
            for key, name, line in wanted:
                template = self._memory.get(key)
                if template is None:
                    missing.append((key, name, line))
                else:
                    self._memory.move_to_end(key)
                    found[key] = _shifted(template, name, line - 1)
            stored = self._load(sorted({k for k, _, _ in missing}))
            for key, name, line in missing:
                data = stored.get(key)
                if data is None:
                    continue
                try:
                    template = planformat.decode(data, name, 1)
                except planformat.FormatError:
                    continue
                self._remember(key, template)
                found[key] = _shifted(template, name, line - 1)
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def put_many(self, entries: Iterable[tuple[bytes, RulePlan, int]]) -> None:
        """Store (key, plan, rule's first line) triples, in memory and on disk."""
        rows = []
        with self._lock:
            for key, plan, line in entries:
                try:
                    data = planformat.encode(plan, line)
                except (KeyError, TypeError, ValueError):  # a node this format cannot hold: not stored
                    continue
                self._remember(key, _shifted(plan, plan.name, 1 - line))
                rows.append((key, data))
            self._store(rows)

    def source(self, key: bytes) -> dict[str, tuple[bytes, int]] | None:
        """Rule name -> (rule key, first line) of the source text with this `source_key`, if known."""
        with self._lock:
            entry = self._sources.get(key)
            if entry is None and self._db is not None:
                try:
                    row = self._db.execute("SELECT rules FROM sources WHERE key = ?", (key,)).fetchone()
                    if row is not None:
                        entry = {n: (bytes.fromhex(k), line) for n, (k, line) in json.loads(row[0]).items()}
                except (sqlite3.Error, ValueError, TypeError) as exc:
                    if isinstance(exc, sqlite3.Error):
                        self._disk_failed(exc)
                    entry = None
            if entry is not None:
                self._sources[key] = entry
                self._sources.move_to_end(key)
                while len(self._sources) > MEMORY_SOURCES:
                    self._sources.popitem(last=False)
            return entry

    def put_source(self, key: bytes, entry: dict[str, tuple[bytes, int]]) -> None:
        with self._lock:
            self._sources[key] = entry
            self._sources.move_to_end(key)
            while len(self._sources) > MEMORY_SOURCES:
                self._sources.popitem(last=False)
            if self._db is None:
                return
            rules = json.dumps({n: (k.hex(), line) for n, (k, line) in entry.items()})
            try:
                with self._db:
                    self._db.execute(
                        "INSERT OR REPLACE INTO sources VALUES (?, ?, ?)", (key, rules.encode(), time.time())
                    )
                    (count,) = self._db.execute("SELECT count(*) FROM sources").fetchone()
                    if count > MEMORY_SOURCES * 16:
                        self._db.execute(
                            "DELETE FROM sources WHERE key IN "
                            "(SELECT key FROM sources ORDER BY stored LIMIT ?)",
                            (count - MEMORY_SOURCES * 16,),
                        )
            except sqlite3.Error as exc:
                self._disk_failed(exc)

    def _remember(self, key: bytes, template: RulePlan) -> None:
        self._memory[key] = template
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _shifted(plan: RulePlan, name: str, delta: int) -> RulePlan:
    """A copy of `plan` for rule `name` with every known line moved by `delta` (0 stays: no location).
    The memory part holds plans placed as if the rule began on line 1."""

    def at(line: int) -> int:
        return line + delta if line > 0 else 0

    notes = [Note(name, n.code, n.text, at(n.line), n.column) for n in plan.notes]
    strings = [replace(s, line=at(s.line)) if s.line > 0 else s for s in plan.strings]
    return RulePlan(name, plan.upper, notes, strings)
