"""The Forest: one database root holding Trees of Shards of immutable Segments (the files of a root are
named in filenames.py): the policy, the manifest, ingest logs, segments and tombstones per shard, the
file catalog (files.py), the plan cache, the quarantine (quarantine.py) and the writer's lock.

Writes go: ingest (append + fsync to the log, files recorded in the catalog) -> publish (log rows -> new
segments -> manifest swap -> logs removed). Documents are deduplicated by Source ID at ingest, against
every live document and every one waiting in the logs, so an ingest knows what it added; publish checks
again. A Tree takes documents until it holds `tree_docs` live ones, then the next Tree opens; inside a
Tree the shard is chosen by the Source ID. Deletes write a new tombstone for each touched segment and swap
the manifest; compaction rewrites segments without their deleted documents and merges small ones.
Readers work on a Snapshot: the segments of one manifest generation, opened through memory maps.

Failures: every write builds its files under fresh names and removes them if it fails before its
manifest swap, so the Forest stays as the last manifest says and the same call can simply be made again;
a full disk is raised as StorageFull. A writer that opens the Forest removes what a crashed writer left
(files no manifest names, logs already published) and loads what unpublished logs hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sspry.document import Document, path_key, unchanged
from sspry.policy import POLICY_VERSION, Policy, PolicyError
from sspry.store import compaction, diskio, quarantine
from sspry.store.errors import ForestError, StorageFull, format_error, full_disk_as, is_full
from sspry.store.filenames import (
    CATALOG_FILE,
    INGEST_DIR,
    LOCK_FILE,
    LOG_PREFIX,
    MANIFEST,
    PLANS_DIR,
    POLICY_FILE,
    SEGMENT_PREFIX,
    TEMP_PREFIX,
    TOMBSTONE_PREFIX,
    TOMBSTONE_SUFFIX,
    TREES_DIR,
    log_name,
    log_seq,
    shard_dir,
    shard_dirs,
)
from sspry.store.files import FileCatalog, FileRecord, PathDeletion, PathsOf
from sspry.store.ingest_log import IngestResult, LogWriter, read_log
from sspry.store.killpoints import kill_point
from sspry.store.manifest import Manifest, SegmentEntry, read_manifest, write_manifest
from sspry.store.quarantine import CorruptSpan, SetAside
from sspry.store.segment import FreshPart, SegmentPart, SegmentReader, build_segment
from sspry.v1 import sspry_pb2

PUBLISH_BYTES = 256 << 20  # a local index publishes whenever this much is waiting in the log


@dataclass
class SegmentView:
    tree: int
    shard: int
    entry: SegmentEntry
    reader: SegmentReader
    live: np.ndarray  # bool per document: not tombstoned


@dataclass
class Snapshot:
    generation: int
    views: list[SegmentView]

    @property
    def documents(self) -> int:
        return sum(v.entry.live for v in self.views)


@dataclass
class PublishResult:
    inserted: int = 0
    duplicates: int = 0
    quarantined: int = 0  # rows set aside (quarantine.py) instead of published
    dropped_bytes: int = 0  # bytes of logs that held no intact frame (torn tails, corrupt spans)
    segments: int = 0


@dataclass
class CompactResult:
    rewritten: int = 0
    written: int = 0
    purged_docs: int = 0
    details: list[str] = field(default_factory=list)


@dataclass
class _Logged:
    """What one unpublished log holds: documents to publish, rows the policy refuses, corrupt spans."""

    docs: list[Document] = field(default_factory=list)
    refused: list[SetAside] = field(default_factory=list)
    corrupt: list[CorruptSpan] = field(default_factory=list)
    torn_tail: int = 0


def read_policy(root: Path) -> Policy:
    """The policy of the forest at `root`; a policy file of another format is refused in one line."""
    path = root / POLICY_FILE
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ForestError(f"{path}: not a policy sspry can read ({exc})") from None
    found = data.get("version", 1) if isinstance(data, dict) else None  # every policy file has one
    if found != POLICY_VERSION:
        error = format_error(path, "policy", found, POLICY_VERSION)
        if found == 1:  # format 1 hashed grams with MurmurHash3: its blooms cannot be searched now
            error = ForestError(
                f"{error}: its blooms use the gram hash of sspry before format 2; create a new forest "
                "(sspry init) and index the files again (see docs/operations.md)"
            )
        raise error
    return Policy.from_json(path.read_text())


def is_forest(root: Path) -> bool:
    return (root / POLICY_FILE).is_file() and (root / MANIFEST).is_file()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced by a rename or rewritten: inode, mtime and size."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return (found.st_ino, found.st_mtime_ns, found.st_size)


def _shard_of(source_id: bytes, shards: int) -> int:
    return int.from_bytes(source_id[:4], "little") % shards


class Forest:
    def __init__(self, root: Path, policy: Policy, writable: bool):
        self.root = root
        self.policy = policy
        self.writable = writable
        self._lock_file = None
        # Three locks, so that searches never wait for a publish and inserts go on during one:
        self._log_lock = threading.Lock()  # the current ingest log (appends, rotation)
        self._write_lock = threading.RLock()  # publish / delete / compact, one at a time
        self._state_lock = threading.RLock()  # the manifest and the snapshot opened from it
        self._readers: dict[str, SegmentReader] = {}
        self._tombstones: dict[str, np.ndarray] = {}
        self._log: LogWriter | None = None
        self._logged: dict[Path, _Logged] = {}  # unpublished log file -> what it holds
        self._pending: set[bytes] = set()  # Source IDs of the documents logged (under _log_lock)
        self.manifest = read_manifest(root)
        self._next_id = self.manifest.next_id  # names handed out, never again in this process
        self._snapshot: Snapshot | None = None
        self._manifest_stamp: tuple[int, int, int] | None = None  # read-only: the manifest last read
        self.catalog = FileCatalog(root / CATALOG_FILE)

    # --- lifecycle ---------------------------------------------------------------------------------
    @staticmethod
    def init(root: Path, policy: Policy, force: bool = False) -> None:
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not force:
                if is_forest(root):
                    existing = read_policy(root)
                    if existing == policy:
                        return  # re-running init with the same policy is a no-op
                    raise PolicyError(
                        f"{root} already holds a forest with a different policy; use --force to recreate it"
                    )
                raise PolicyError(f"{root} exists and is not an empty directory; use --force to replace it")
            if not is_forest(root):
                raise PolicyError(f"refusing to --force {root}: it is not an sspry forest")
            with Forest.open(root, writable=True):
                pass  # takes the lock: refuse to wipe a forest someone is writing
            shutil.rmtree(root)
        diskio.make_dirs(root / INGEST_DIR)
        diskio.make_dirs(root / TREES_DIR)
        diskio.atomic_write(root / POLICY_FILE, policy.to_json().encode(), "policy")
        write_manifest(root, Manifest())  # last: a root without a manifest is no forest yet

    @classmethod
    def open(cls, root: Path | str, writable: bool = False) -> Forest:
        """Open a forest; a writable open recovers from an interrupted writer first. Files of another
        format (policy, manifest, catalog, segments, logs) are refused with a ForestError naming both
        versions."""
        root = Path(root)
        if not is_forest(root):
            raise ForestError(
                f"{root} is not an initialised sspry forest: run `sspry init --root {root}` first"
            )
        policy = read_policy(root)
        lock_file = None
        if writable:
            lock_file = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held for the Forest's lifetime
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                raise ForestError(
                    f"{root} is being written by another sspry process (a server or a local index); "
                    "stop it or use the server's commands"
                ) from None
        try:
            forest = cls(root, policy, writable)
        except BaseException:
            if lock_file is not None:
                lock_file.close()
            raise
        forest._lock_file = lock_file
        try:
            if writable:
                forest._recover()
            forest.snapshot()  # opens every segment: one of another format is refused here
            if forest.catalog.created:
                forest._catalog_legacy_paths()
        except BaseException:
            forest.close()
            raise
        return forest

    def close(self) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        with self._write_lock:
            self.catalog.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> Forest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- paths -------------------------------------------------------------------------------------
    def _shard_dir(self, tree: int, shard: int) -> Path:
        return shard_dir(self.root, tree, shard)

    def _logs(self) -> list[Path]:
        return sorted((self.root / INGEST_DIR).glob(f"{LOG_PREFIX}*.bin"), key=log_seq)

    def _recover(self) -> None:
        """Remove what an interrupted writer left behind (published logs, files no manifest names,
        temporary files, quarantine entries of a publish that did not finish), then load what the
        unpublished logs hold."""
        for path in self._logs():
            if log_seq(path) <= self.manifest.published_log:
                path.unlink()
        referenced = set()
        for t, s, entry in self.manifest.entries():
            referenced.add(self._shard_dir(t, s) / entry.name)
            if entry.tombstone:
                referenced.add(self._shard_dir(t, s) / entry.tombstone)
        for directory in shard_dirs(self.root):
            for child in directory.iterdir():
                if child not in referenced:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        for child in self.root.glob(f"{TEMP_PREFIX}*"):  # a manifest or policy never renamed
            diskio.remove(child)
        quarantine.remove_unfinished(self.root, self.manifest.published_log)
        # What the logs hold waits in memory for the next publish, as it does for rows ingested later;
        # their files are recorded again, in case the catalog commit did not follow the log's fsync
        # (best effort: on a full disk the forest still opens, and those inserts were not acknowledged).
        for path in self._logs():
            logged = self._load_log(path)
            self._logged[path] = logged
            self._pending.update(doc.source_id for doc in logged.docs)
            with contextlib.suppress(StorageFull), full_disk_as("record files"):
                self._record_files(logged.docs)

    def _load_log(self, path: Path) -> _Logged:
        contents = read_log(path)
        logged = _Logged(torn_tail=contents.torn_tail)
        logged.corrupt = [CorruptSpan(path.name, offset, data) for offset, data in contents.corrupt]
        for row in contents.rows:
            try:
                logged.docs.append(Document.from_row(row, self.policy))
            except PolicyError as exc:  # logged before this limit existed: set aside at publish
                logged.refused.append(SetAside(path.name, row, str(exc)))
        return logged

    def _catalog_legacy_paths(self) -> None:
        """A new catalog beside segments written before it existed takes the paths they stored."""
        records = []
        for view in self.snapshot().views:
            reader = view.reader
            for doc in np.flatnonzero(view.live).tolist():
                path = reader.legacy_path(doc)
                if path is not None:
                    size = int(reader.filesize[doc])
                    records.append(FileRecord(path_key(path), path, reader.source_id(doc), size, -1))
        self.catalog.record(records)

    # --- reading -----------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The current segments. Read-only opens re-read the manifest when it was replaced (a writer
        renames a new one into place, so its inode changes; a stat is 2 us, reading it 90 us of a 0.8 ms
        single-rule search at 3,000 documents) and retry when a concurrent writer removed a segment
        between reading the manifest and opening it."""
        with self._state_lock:
            if self._snapshot is not None and (
                self._snapshot.generation == self.manifest.generation
                if self.writable
                else self._manifest_stamp == _stamp(self.root / MANIFEST)
            ):
                return self._snapshot
            for attempt in range(20):
                if not self.writable:
                    self._manifest_stamp = _stamp(self.root / MANIFEST)  # before reading: never newer
                    self.manifest = read_manifest(self.root)
                try:
                    self._snapshot = self._open_snapshot(self.manifest)
                    return self._snapshot
                except FileNotFoundError:
                    if self.writable or attempt == 19:
                        raise
            raise AssertionError("unreachable")

    def _open_snapshot(self, manifest: Manifest) -> Snapshot:
        views = []
        keep: dict[str, SegmentReader] = {}
        for t, s, entry in manifest.entries():
            key = f"{t}/{s}/{entry.name}"
            reader = self._readers.get(key) or SegmentReader(self._shard_dir(t, s) / entry.name)
            keep[key] = reader
            live = np.ones(entry.docs, dtype=bool)
            if entry.tombstone:
                deleted = self._tombstone(self._shard_dir(t, s) / entry.tombstone, entry.docs)
                live = ~deleted
            views.append(SegmentView(t, s, entry, reader, live))
        self._readers = keep
        return Snapshot(manifest.generation, views)

    def _tombstone(self, path: Path, docs: int) -> np.ndarray:
        key = str(path)
        cached = self._tombstones.get(key)
        if cached is None:
            cached = np.unpackbits(np.load(path), bitorder="little")[:docs].astype(bool)
            self._tombstones = {k: v for k, v in self._tombstones.items() if Path(k).parent == path.parent}
            self._tombstones[key] = cached
        return cached

    # --- writing -----------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise ForestError("forest opened read-only")

    @contextlib.contextmanager
    def _attempt(self, manifest: Manifest) -> Iterator[list[Path]]:
        """The list of files a change makes toward `manifest`. If the change fails before `manifest` is
        swapped in, they are removed (nothing refers to them); once swapped in they belong to the forest."""
        made: list[Path] = []
        try:
            yield made
        except BaseException:
            if self.manifest is not manifest:
                for path in made:
                    diskio.remove(path)
            raise

    def _full_disk(self, verb: str):
        """Raise a full disk met while doing `verb` as StorageFull("cannot <verb> <root>: ...")."""
        return full_disk_as(f"cannot {verb} {self.root}")

    def _reserve(self, manifest: Manifest, prefix: str) -> str:
        """A name for a new segment or tombstone, never handed out before in this process (a failed
        attempt's name is not reused, even if its files could not be removed)."""
        manifest.next_id = max(manifest.next_id, self._next_id)
        name = manifest.new_name(prefix)
        self._next_id = manifest.next_id
        return name

    @property
    def pending_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._logs())

    def ingest_rows(self, rows: Sequence[sspry_pb2.DocumentRow]) -> IngestResult:
        """Validate rows against the policy, then ingest them as `ingest` does.
        Raises PolicyError (nothing written) if any row is malformed."""
        self._require_writable()
        docs = [Document.from_row(row, self.policy) for row in rows]
        with self._full_disk("write to"):
            return self._append(docs, rows)

    def ingest(self, docs: Iterable[Document]) -> IngestResult:
        """Append the documents the forest does not hold yet durably to the ingest log, and record every
        document's file in the catalog; returns how many were new and how many duplicates. Raises
        PolicyError (nothing written) if a document breaks a limit, StorageFull on a full disk (nothing
        acknowledged: the same call succeeds once space is freed)."""
        self._require_writable()
        docs = list(docs)
        for doc in docs:
            doc.check(self.policy)
        with self._full_disk("write to"):
            return self._append(docs, None)

    def _append(self, docs: list[Document], rows: Sequence[sspry_pb2.DocumentRow] | None) -> IngestResult:
        """Keep the new documents in memory for the next publish, so it need not read the log back (the
        log is for crashes: a new process publishes from it)."""
        with self._log_lock:
            present = self.contains([doc.source_id for doc in docs])
            fresh: list[int] = []
            seen: set[bytes] = set()
            for i, doc in enumerate(docs):
                if not (present[i] or doc.source_id in self._pending or doc.source_id in seen):
                    seen.add(doc.source_id)
                    fresh.append(i)
            if fresh:
                kill_point("ingest.checked")
                log = self._current_log()
                try:
                    log.append([rows[i] if rows is not None else docs[i].to_row() for i in fresh])
                finally:
                    if log.broken:  # a torn frame it could not cut off ends this log: start another
                        log.close()
                        self._log = None
                self._logged[log.path].docs.extend(docs[i] for i in fresh)
                self._pending |= seen
            kill_point("ingest.logged")
            self._record_files(docs)
            kill_point("ingest.recorded")
        return IngestResult(inserted=len(fresh), duplicates=len(docs) - len(fresh))

    def _current_log(self) -> LogWriter:
        if self._log is None:
            seq = max([self.manifest.published_log, *(log_seq(p) for p in self._logs())]) + 1
            self._log = LogWriter(self.root / INGEST_DIR / log_name(seq))
            self._logged[self._log.path] = _Logged()
        return self._log

    def _record_files(self, docs: Iterable[Document]) -> None:
        self.catalog.record(
            [
                FileRecord(doc.path_key, doc.path, doc.source_id, doc.filesize, doc.mtime_ns)
                for doc in docs
                if doc.path_key
            ]
        )

    def holds(self, source_ids: Sequence[bytes]) -> np.ndarray:
        """For each Source ID, whether the forest has it: live, or logged and waiting to be published."""
        present = self.contains(source_ids)
        with self._log_lock:
            pending = self._pending
            return present | np.array([i in pending for i in source_ids], dtype=bool)

    def record_files(self, source_ids: Sequence[bytes], records: Sequence[FileRecord]) -> np.ndarray:
        """`holds(source_ids)`, recording records[i] for each document held (a file found again)."""
        held = self.holds(source_ids)
        kill_point("dedup.checked")
        with self._full_disk("write to"):
            self.catalog.record([r for r, h in zip(records, held, strict=True) if h])
        kill_point("dedup.recorded")
        return held

    def known_files(self, stamps: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        """For each (path key, size, mtime_ns): was that file indexed here, unchanged since, and does the
        forest still hold its document? Such a file need not be read again."""
        found = self.catalog.lookup([key for key, _, _ in stamps])
        same: list[bytes | None] = []  # the recorded document where the file is unchanged
        for key, size, mtime in stamps:
            record = found.get(key)
            kept = record is not None and unchanged((record.size, record.mtime_ns), size, mtime)
            same.append(record.source_id if kept else None)
        held = iter(self.holds([i for i in same if i is not None]).tolist())
        return [i is not None and next(held) for i in same]

    def paths_of(self, source_ids: Sequence[bytes]) -> dict[bytes, PathsOf]:
        return self.catalog.paths_of(source_ids)

    def publish(self) -> PublishResult:
        """Turn every logged row into segments and swap the manifest. Rows that cannot be published are
        set aside in the quarantine instead of blocking the others. On failure (a full disk: StorageFull)
        nothing changes: the logs keep every row, and calling again publishes them."""
        self._require_writable()
        with self._write_lock, self._full_disk("publish"):
            return self._publish()

    def _publish(self) -> PublishResult:
        result = PublishResult()
        with self._log_lock:  # rotate: later inserts go to a new log, this publish takes the rest
            if self._log is not None:
                self._log.close()
                self._log = None
            logs = [p for p in self._logs() if log_seq(p) > self.manifest.published_log]
        if not logs:
            return result
        kill_point("publish.start")
        held = [self._logged[p] if p in self._logged else self._load_log(p) for p in logs]
        docs = [doc for logged in held for doc in logged.docs]
        result.dropped_bytes = sum(h.torn_tail + sum(len(c.data) for c in h.corrupt) for h in held)
        fresh = self._dedup(docs, result)
        kill_point("publish.deduped")
        manifest = self.manifest.copy()
        manifest.published_log = max(log_seq(p) for p in logs)
        with self._attempt(manifest) as made:
            failed: list[SetAside] = []
            for tree, shard, group in self._route(fresh, manifest):
                result.segments += self._build_fresh(tree, shard, group, manifest, made, failed)
            set_aside = [r for h in held for r in h.refused] + failed
            corrupt = [c for h in held for c in h.corrupt]
            if set_aside or corrupt:
                made.append(quarantine.write_entry(self.root, manifest.published_log, set_aside, corrupt))
            kill_point("publish.built")
            try:
                self._swap(manifest)
            except BaseException:
                if self.manifest is manifest:  # swapped, but its directory's fsync failed: published
                    self._published(logs, docs)  # (the logs stay: the next writer to open removes them)
                raise
        kill_point("publish.swapped")
        for path in logs:
            with contextlib.suppress(OSError):
                path.unlink()
            kill_point("publish.log_removed")
        self._published(logs, docs)
        result.quarantined = len(set_aside)
        result.inserted = len(fresh) - len(failed)
        return result

    def _published(self, logs: list[Path], docs: list[Document]) -> None:
        """Forget what a publish made live: held through the manifest now, no longer pending."""
        for path in logs:
            self._logged.pop(path, None)
        with self._log_lock:
            self._pending.difference_update(doc.source_id for doc in docs)

    def _build_fresh(
        self,
        tree: int,
        shard: int,
        docs: list[Document],
        manifest: Manifest,
        made: list[Path],
        failed: list[SetAside],
    ) -> int:
        """Build `docs` into a segment of the shard; returns how many segments were written. A build that
        fails for a reason other than the disk (a row this code cannot publish, whatever the limits said)
        is split in halves, down to the single documents that fail alone, which are set aside."""
        name = self._reserve(manifest, SEGMENT_PREFIX)
        directory = self._shard_dir(tree, shard) / name
        try:
            count = build_segment(directory, [FreshPart(docs, self.policy)], self.policy)
        except Exception as exc:
            if isinstance(exc, OSError) or is_full(exc):
                raise  # the environment, not the rows: the whole publish fails and is retried
            if len(docs) == 1:
                reason = f"segment build failed: {type(exc).__name__}: {exc}"
                failed.append(SetAside("publish", docs[0].to_row(), reason))
                return 0
            half = len(docs) // 2
            return self._build_fresh(tree, shard, docs[:half], manifest, made, failed) + self._build_fresh(
                tree, shard, docs[half:], manifest, made, failed
            )
        made.append(directory)
        manifest.trees[tree][shard].append(SegmentEntry(name=name, docs=count))
        return 1

    def contains(self, source_ids: Sequence[bytes]) -> np.ndarray:
        """For each Source ID, whether a live published document has it."""
        present = np.zeros(len(source_ids), dtype=bool)
        if len(source_ids):
            for view in self.snapshot().views:
                found = view.reader.find(source_ids)
                hit = found >= 0
                present[hit] |= view.live[found[hit]]
        return present

    def _dedup(self, docs: list[Document], result: PublishResult) -> list[Document]:
        unique: dict[bytes, Document] = {}
        for doc in docs:
            unique.setdefault(doc.source_id, doc)
        ids = list(unique)
        present = self.contains(ids)
        fresh = [unique[i] for i, p in zip(ids, present, strict=True) if not p]
        result.duplicates = len(docs) - len(fresh)
        return fresh

    def _route(self, docs: list[Document], manifest: Manifest):
        """Yield (tree, shard, documents) groups: fill the newest Tree up to tree_docs, then open more."""
        at = 0
        while at < len(docs):
            if not manifest.trees or manifest.tree_live(len(manifest.trees) - 1) >= self.policy.tree_docs:
                manifest.trees.append([[] for _ in range(self.policy.shards)])
            tree = len(manifest.trees) - 1
            room = self.policy.tree_docs - manifest.tree_live(tree)
            batch, at = docs[at : at + room], at + room
            by_shard: dict[int, list[Document]] = {}
            for doc in batch:
                by_shard.setdefault(_shard_of(doc.source_id, self.policy.shards), []).append(doc)
            for shard in sorted(by_shard):
                yield tree, shard, by_shard[shard]

    def _swap(self, manifest: Manifest) -> None:
        """Make `manifest` current, then remove the files the old one named and the new one does not.
        `self.manifest is manifest` afterwards tells a caller whether the swap took, even when it raised
        (the rename done, the directory's fsync failed): then its new files are referenced and stay."""
        with self._state_lock:
            old = self.manifest
            manifest.generation = old.generation + 1
            try:
                write_manifest(self.root, manifest)
            except BaseException:
                with contextlib.suppress(Exception):
                    if read_manifest(self.root).generation == manifest.generation:
                        self.manifest = manifest
                raise
            self.manifest = manifest
        kill_point("swap.done")
        now = {(t, s, e.name) for t, s, e in manifest.entries()} | {
            (t, s, e.tombstone) for t, s, e in manifest.entries() if e.tombstone
        }
        for t, s, entry in old.entries():
            for name in (entry.name, entry.tombstone):
                if name and (t, s, name) not in now:
                    diskio.remove(self._shard_dir(t, s) / name)
                    kill_point("swap.removed")

    def delete(self, source_ids: Sequence[bytes]) -> list[bool]:
        """Tombstone every live document with one of `source_ids`; True per id that was deleted."""
        self._require_writable()
        with self._write_lock, self._full_disk("delete from"):
            self._publish()
            kill_point("delete.start")
            deleted = [False] * len(source_ids)
            manifest = self.manifest.copy()
            with self._attempt(manifest) as made:
                for view in self.snapshot().views:
                    found = view.reader.find(source_ids)
                    hits = [(i, int(d)) for i, d in enumerate(found) if d >= 0 and view.live[d]]
                    if not hits:
                        continue
                    dead = ~view.live.copy()
                    for i, doc in hits:
                        dead[doc] = True
                        deleted[i] = True
                    shard = manifest.trees[view.tree][view.shard]
                    entry = next(e for e in shard if e.name == view.entry.name)
                    entry.tombstone = self._reserve(manifest, TOMBSTONE_PREFIX) + TOMBSTONE_SUFFIX
                    entry.deleted = int(dead.sum())
                    path = self._shard_dir(view.tree, view.shard) / entry.tombstone
                    packed = io.BytesIO()
                    np.save(packed, np.packbits(dead, bitorder="little"))
                    diskio.atomic_write(path, packed.getvalue(), "tombstone")
                    made.append(path)
                if made:
                    self._swap(manifest)
            kill_point("delete.swapped")
            self.catalog.forget_documents(list(source_ids))
            kill_point("delete.forgotten")
            return deleted

    def delete_paths(self, paths: Sequence[str]) -> list[PathDeletion]:
        """Forget each (canonical) path; a document goes when the last of its paths goes."""
        self._require_writable()
        with self._write_lock, self._full_disk("delete from"):
            out = []
            for path in paths:
                found = self.catalog.forget_path(path_key(path))
                if found is None:
                    out.append(PathDeletion(path, None))
                    continue
                source_id, left = found
                gone = left == 0 and self.delete([source_id])[0]
                out.append(PathDeletion(path, source_id, gone, left))
            return out

    def compact(self, full: bool = False, shard_limit: int = 0) -> CompactResult:
        """Rewrite segments: all of a shard into one (`full`), or the size-tiered choice (automatic).
        With `shard_limit`, at most that many shards are rewritten in this call (the write lock, which
        publishing waits for, is held for those only). A group whose segment cannot be built (other
        than for a full disk) is left as it is, and said in `details`; on a full disk (StorageFull)
        nothing changes."""
        self._require_writable()
        result = CompactResult()
        with self._write_lock, self._full_disk("compact"):
            self._publish()
            kill_point("compact.start")
            snapshot = self.snapshot()
            views = {(v.tree, v.shard, v.entry.name): v for v in snapshot.views}
            manifest = self.manifest.copy()
            with self._attempt(manifest) as made:
                chosen = [
                    (t, s, segments, groups)
                    for t, shards in enumerate(manifest.trees)
                    for s, segments in enumerate(shards)
                    if (groups := compaction.plan_shard(segments, full))
                ]
                for t, s, segments, groups in chosen[: shard_limit or None]:
                    for group in groups:
                        self._merge(t, s, group, segments, views, manifest, made, result)
                if result.rewritten:
                    self._swap(manifest)
            kill_point("compact.swapped")
        return result

    def _merge(self, t, s, group, segments, views, manifest, made, result) -> None:
        """Rewrite one group of a shard's segments into one (none when nothing in it is live)."""
        parts = [SegmentPart(views[(t, s, e.name)].reader, views[(t, s, e.name)].live) for e in group]
        live = sum(p.size for p in parts)
        names = {e.name for e in group}
        survivors = [e for e in segments if e.name not in names]
        if live:
            name = self._reserve(manifest, SEGMENT_PREFIX)
            try:
                build_segment(self._shard_dir(t, s) / name, parts, self.policy)
            except Exception as exc:
                if isinstance(exc, OSError) or is_full(exc):
                    raise
                result.details.append(
                    f"tree {t} shard {s}: left {sorted(names)} as they are: {type(exc).__name__}: {exc}"
                )
                return
            made.append(self._shard_dir(t, s) / name)
            kill_point("compact.built")
            survivors.append(SegmentEntry(name=name, docs=live))
            result.written += 1
        segments[:] = survivors
        result.rewritten += len(group)
        result.purged_docs += sum(e.deleted for e in group)

    @property
    def plan_cache_dir(self) -> Path:
        """Where searches of this forest keep their plan cache (the planner owns what is inside)."""
        return self.root / PLANS_DIR

    # --- reporting ---------------------------------------------------------------------------------
    def info(self) -> dict:
        snapshot = self.snapshot()
        disk = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    disk += os.stat(os.path.join(directory, name)).st_size
        set_aside = quarantine.counts(self.root)
        return {
            "root": str(self.root),
            "documents": snapshot.documents,
            "document_bytes": sum(int(v.reader.filesize[v.live].sum()) for v in snapshot.views),
            "deleted": sum(v.entry.deleted for v in snapshot.views),
            "trees": len(self.manifest.trees),
            "shards": self.policy.shards,
            "segments": len(snapshot.views),
            "bloom_bytes": sum(v.reader.bloom_bytes() for v in snapshot.views),
            "disk_bytes": disk,
            "pending_log_bytes": self.pending_bytes,
            "files": self.catalog.files(),
            "quarantined_rows": set_aside.rows,
            "quarantined_corrupt_bytes": set_aside.corrupt_bytes,
            "generation": snapshot.generation,
            "policy": self.policy.describe(),
        }
