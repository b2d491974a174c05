"""The file catalog: every file a Forest's documents were indexed from, in `<root>/files.sqlite`.

One row per file, keyed by `document.path_key(canonical path)`:

  key BLOB UNIQUE       blake2b-128 of the path (recorded for every forest)
  path BLOB             the path itself (os.fsencode), only for forests that store paths
  source_id BLOB        the document the file held when it was indexed
  size, mtime_ns        the file's size and modification time then (mtime -1: unknown)

It answers three questions that segments, being immutable, cannot: which paths a document has (all of
them: the same content indexed from two paths keeps both), whether a file is already indexed and
unchanged (a re-run need not read it), and which document a path names (delete by path forgets that
file, and the document only when it has no path left). Paths are mutable facts, so they live here and
not in segments.

SQLite in WAL mode: writers (one Forest process) and readers (searches, other processes) do not block
each other, and every commit is durable (synchronous=FULL) before an insert is acknowledged.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sspry.store import diskio
from sspry.store.errors import ForestError

FORMAT_VERSION = 1
SHOWN_PATHS = 16  # paths reported per candidate (the total is reported beside them)
_CHUNK = 500  # parameters per IN (...) query, under SQLite's limit
_PAGE = 4096  # what a write transaction costs at least, for the disk-full injector (diskio.charge)
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsdecode's

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    path BLOB,
    source_id BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_source ON files(source_id);
"""


class CatalogError(ForestError):
    """A catalog this sspry cannot read (written by a newer version)."""


@dataclass(frozen=True)
class FileRecord:
    key: bytes
    path: str | None
    source_id: bytes
    size: int
    mtime_ns: int


class PathsOf(NamedTuple):  # a tuple: one is made per candidate document, cheaper than a dataclass
    """The recorded paths of one document: the first SHOWN_PATHS of them, and how many there are; with
    each shown path, the (size, mtime_ns) it had when indexed (verification trusts a file that still
    has them: engines.py)."""

    paths: tuple[str, ...]
    count: int
    stamps: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class PathDeletion:
    """What deleting one path did: the document it was recorded for (None: not recorded), whether that
    document went with it (it was the last path), and how many paths the document has left."""

    path: str
    source_id: bytes | None
    document_deleted: bool = False
    remaining_paths: int = 0


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class FileCatalog:
    """Thread-safe: one connection, used under a lock (each statement is short)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > FORMAT_VERSION:
            self._db.close()
            raise CatalogError(
                f"{path}: file catalog format {version}, this sspry reads format {FORMAT_VERSION}"
            )
        self.created = version == 0
        if self.created and not readonly:
            diskio.charge(_PAGE, path)
            with self._lock:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
            diskio.fsync_path(path.parent)  # the new file's entry (SQLite syncs its WAL's itself)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def backup(self, dest: Path) -> None:
        """A consistent copy of the catalog at `dest`, through SQLite's online backup (writers go on)."""
        diskio.charge(self.path.stat().st_size, dest)
        target = sqlite3.connect(dest)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()
        diskio.fsync_path(dest)

    # --- writing -----------------------------------------------------------------------------------
    def record(self, records: Sequence[FileRecord]) -> None:
        """Remember where documents were read from (a path seen again now names what it holds now)."""
        if not records:
            return
        rows = [
            (r.key, None if r.path is None else os.fsencode(r.path), r.source_id, r.size, r.mtime_ns)
            for r in records
        ]
        diskio.charge(_PAGE + sum(64 + len(row[1] or b"") for row in rows), self.path)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO files(key, path, source_id, size, mtime_ns) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET path=excluded.path, source_id=excluded.source_id, "
                    "size=excluded.size, mtime_ns=excluded.mtime_ns",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def forget_documents(self, source_ids: Sequence[bytes]) -> None:
        """Drop every path of these documents (they were deleted)."""
        diskio.charge(_PAGE, self.path)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for part in _chunks(list(source_ids)):
                marks = ",".join("?" * len(part))
                self._db.execute(f"DELETE FROM files WHERE source_id IN ({marks})", part)
            self._db.execute("COMMIT")

    def forget_path(self, key: bytes) -> tuple[bytes, int] | None:
        """Forget one file: (the document it was recorded for, paths that document has left), or None
        when the path was not recorded."""
        diskio.charge(_PAGE, self.path)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            found = self._db.execute("SELECT source_id FROM files WHERE key = ?", (key,)).fetchone()
            if found is None:
                self._db.execute("COMMIT")
                return None
            self._db.execute("DELETE FROM files WHERE key = ?", (key,))
            left = self._db.execute("SELECT COUNT(*) FROM files WHERE source_id = ?", found).fetchone()[0]
            self._db.execute("COMMIT")
            return bytes(found[0]), int(left)

    # --- reading -----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, FileRecord]:
        """The records of those keys that are recorded."""
        found: dict[bytes, FileRecord] = {}
        with self._lock:
            for part in _chunks(list(keys)):
                marks = ",".join("?" * len(part))
                for key, path, source_id, size, mtime in self._db.execute(
                    f"SELECT key, path, source_id, size, mtime_ns FROM files WHERE key IN ({marks})", part
                ):
                    found[bytes(key)] = FileRecord(
                        bytes(key), None if path is None else os.fsdecode(path), bytes(source_id), size, mtime
                    )
        return found

    def paths_of(self, source_ids: Sequence[bytes]) -> dict[bytes, PathsOf]:
        """For each document with recorded paths: the first SHOWN_PATHS paths (in the order they were
        recorded), their number and their stamps. Documents recorded without paths have empty tuples."""
        shown: dict[bytes, list[str]] = {}
        stamps: dict[bytes, list[tuple[int, int]]] = {}
        counts: dict[bytes, int] = {}
        with self._lock:
            for part in _chunks(list(dict.fromkeys(source_ids))):
                marks = ",".join("?" * len(part))
                for source_id, path, size, mtime in self._db.execute(
                    f"SELECT source_id, path, size, mtime_ns FROM files WHERE source_id IN ({marks}) "
                    "ORDER BY id",
                    part,
                ):
                    source_id = bytes(source_id)
                    counts[source_id] = counts.get(source_id, 0) + 1
                    paths = shown.setdefault(source_id, [])
                    if path is not None and len(paths) < SHOWN_PATHS:
                        paths.append(path.decode(_FS_ENCODING, _FS_ERRORS))  # os.fsdecode, less checking
                        stamps.setdefault(source_id, []).append((size, mtime))
        return {i: PathsOf(tuple(shown[i]), counts[i], tuple(stamps.get(i, ()))) for i in counts}

    def files(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0])
