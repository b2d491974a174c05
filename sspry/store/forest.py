"""The Forest: one database root holding Trees of Shards of immutable Segments.

  <root>/sspry.json                     the policy, fixed at init
  <root>/manifest.json                  which segments and tombstones are current (atomic swap)
  <root>/ingest/log_NNNNNNNNNN.bin      durable ingest logs not yet published
  <root>/trees/tree_NNNN/shard_NNN/seg_NNNNNNNNNN/   segments
  <root>/trees/tree_NNNN/shard_NNN/tomb_NNNNNNNNNN.npy  tombstone bitmaps (packed, one per segment version)
  <root>/files.sqlite                   the file catalog: every file indexed, by path key (files.py)
  <root>/.lock                          held (flock) by the one process allowed to write

Writes go: ingest (append + fsync to the log, files recorded in the catalog) -> publish (log rows -> new
segments -> manifest swap -> logs removed). Documents are deduplicated by Source ID at ingest, against
every live document and every one waiting in the logs, so an ingest knows what it added; publish checks
again. A Tree takes documents until it holds `tree_docs` live ones, then the next Tree opens; inside a
Tree the shard is chosen by the Source ID. Deletes write a new tombstone for each touched segment and swap
the manifest; compaction rewrites segments without their deleted documents and merges small ones.
Readers work on a Snapshot: the segments of one manifest generation, opened through memory maps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sspry.document import Document, path_key
from sspry.policy import Policy, PolicyError
from sspry.store import compaction
from sspry.store.files import CATALOG_FILE, FileCatalog, FileRecord, PathDeletion, PathsOf
from sspry.store.ingest_log import LOG_PREFIX, IngestResult, LogWriter, log_name, log_seq, read_log
from sspry.store.manifest import MANIFEST, Manifest, SegmentEntry, read_manifest, write_manifest
from sspry.store.segment import FreshPart, SegmentPart, SegmentReader, build_segment
from sspry.v1 import sspry_pb2

POLICY_FILE = "sspry.json"
LOCK_FILE = ".lock"
PLANS_DIR = "plans"  # the planner's plan cache (sspry.query.plancache): derived data, safe to delete
PUBLISH_BYTES = 256 << 20  # a local index publishes whenever this much is waiting in the log


class ForestError(Exception):
    """A Forest that cannot be opened or written as asked (not initialised, locked, corrupt)."""


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
    rejected: int = 0
    dropped_bytes: int = 0
    segments: int = 0


@dataclass
class CompactResult:
    rewritten: int = 0
    written: int = 0
    purged_docs: int = 0
    details: list[str] = field(default_factory=list)


def is_forest(root: Path) -> bool:
    return (root / POLICY_FILE).is_file() and (root / MANIFEST).is_file()


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
        self._logged_docs: dict[Path, list[Document]] = {}  # unpublished log file -> its documents
        self._pending: set[bytes] = set()  # Source IDs of those documents (under _log_lock)
        self._dropped_bytes = 0  # torn log tails found at open, reported by the next publish
        self.manifest = read_manifest(root)
        self._snapshot: Snapshot | None = None
        self.catalog = FileCatalog(root / CATALOG_FILE)

    # --- lifecycle ---------------------------------------------------------------------------------
    @staticmethod
    def init(root: Path, policy: Policy, force: bool = False) -> None:
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not force:
                if is_forest(root):
                    existing = Policy.from_json((root / POLICY_FILE).read_text())
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
        root.mkdir(parents=True, exist_ok=True)
        (root / "ingest").mkdir()
        (root / "trees").mkdir()
        (root / POLICY_FILE).write_text(policy.to_json())
        write_manifest(root, Manifest())

    @classmethod
    def open(cls, root: Path | str, writable: bool = False) -> Forest:
        root = Path(root)
        if not is_forest(root):
            raise ForestError(
                f"{root} is not an initialised sspry forest: run `sspry init --root {root}` first"
            )
        policy = Policy.from_json((root / POLICY_FILE).read_text())
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
        return self.root / "trees" / f"tree_{tree:04d}" / f"shard_{shard:03d}"

    def _logs(self) -> list[Path]:
        return sorted((self.root / "ingest").glob(f"{LOG_PREFIX}*.bin"), key=log_seq)

    def _recover(self) -> None:
        """Remove what an interrupted writer left behind: published logs, unreferenced files."""
        for path in self._logs():
            if log_seq(path) <= self.manifest.published_log:
                path.unlink()
        referenced = set()
        for t, s, entry in self.manifest.entries():
            referenced.add(self._shard_dir(t, s) / entry.name)
            if entry.tombstone:
                referenced.add(self._shard_dir(t, s) / entry.tombstone)
        for shard_dir in (self.root / "trees").glob("tree_*/shard_*"):
            for child in shard_dir.iterdir():
                if child not in referenced:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        # What the logs hold waits in memory for the next publish, as it does for rows ingested later;
        # their files are recorded again, in case the catalog commit did not follow the log's fsync.
        for path in self._logs():
            rows, dropped = read_log(path)
            self._dropped_bytes += dropped
            docs = []
            for row in rows:
                with contextlib.suppress(PolicyError):  # a row this policy refuses is dropped at publish
                    docs.append(Document.from_row(row, self.policy))
            self._logged_docs[path] = docs
            self._pending.update(doc.source_id for doc in docs)
            self._record_files(docs)

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
        """The current segments. Read-only opens re-read the manifest and retry when a concurrent
        writer removed a segment between reading the manifest and opening it."""
        with self._state_lock:
            if (
                self.writable
                and self._snapshot is not None
                and self._snapshot.generation == self.manifest.generation
            ):
                return self._snapshot
            for attempt in range(20):
                if not self.writable:
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

    @property
    def pending_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._logs())

    def ingest_rows(self, rows: Sequence[sspry_pb2.DocumentRow]) -> IngestResult:
        """Validate rows against the policy, then ingest them as `ingest` does.
        Raises PolicyError (nothing written) if any row is malformed."""
        self._require_writable()
        return self._append([Document.from_row(row, self.policy) for row in rows], rows)

    def ingest(self, docs: Iterable[Document]) -> IngestResult:
        """Append the documents the forest does not hold yet durably to the ingest log, and record every
        document's file in the catalog; returns how many were new and how many duplicates."""
        self._require_writable()
        return self._append(list(docs), None)

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
                if self._log is None:
                    logs = self._logs()
                    seq = max([self.manifest.published_log, *(log_seq(p) for p in logs)]) + 1
                    self._log = LogWriter(self.root / "ingest" / log_name(seq))
                    self._logged_docs[self._log.path] = []
                self._log.append([rows[i] if rows is not None else docs[i].to_row() for i in fresh])
                self._logged_docs[self._log.path].extend(docs[i] for i in fresh)
                self._pending |= seen
            self._record_files(docs)
        return IngestResult(inserted=len(fresh), duplicates=len(docs) - len(fresh))

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
        self.catalog.record([r for r, h in zip(records, held, strict=True) if h])
        return held

    def known_files(self, stamps: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        """For each (path key, size, mtime_ns): was that file indexed here, unchanged since, and does the
        forest still hold its document? Such a file need not be read again."""
        found = self.catalog.lookup([key for key, _, _ in stamps])
        same: list[bytes | None] = []  # the recorded document where the file is unchanged
        for key, size, mtime in stamps:
            record = found.get(key)
            unchanged = record is not None and mtime >= 0 and (record.size, record.mtime_ns) == (size, mtime)
            same.append(record.source_id if unchanged else None)
        held = iter(self.holds([i for i in same if i is not None]).tolist())
        return [i is not None and next(held) for i in same]

    def paths_of(self, source_ids: Sequence[bytes]) -> dict[bytes, PathsOf]:
        return self.catalog.paths_of(source_ids)

    def publish(self) -> PublishResult:
        """Turn every logged row into segments and swap the manifest."""
        self._require_writable()
        result = PublishResult()
        with self._write_lock:
            with self._log_lock:  # rotate: later inserts go to a new log, this publish takes the rest
                if self._log is not None:
                    self._log.close()
                    self._log = None
                logs = [p for p in self._logs() if log_seq(p) > self.manifest.published_log]
            if not logs:
                return result
            result.dropped_bytes, self._dropped_bytes = self._dropped_bytes, 0
            docs: list[Document] = []
            for path in logs:
                kept = self._logged_docs.pop(path, None)
                if kept is not None:
                    docs.extend(kept)
                    continue
                rows, dropped = read_log(path)
                result.dropped_bytes += dropped
                for row in rows:
                    try:
                        docs.append(Document.from_row(row, self.policy))
                    except PolicyError:
                        result.rejected += 1
            fresh = self._dedup(docs, result)
            manifest = Manifest.from_json(self.manifest.to_json())
            for tree, shard, group in self._route(fresh, manifest):
                name = manifest.new_name("seg")
                directory = self._shard_dir(tree, shard) / name
                count = build_segment(directory, [FreshPart(group, self.policy)], self.policy)
                manifest.trees[tree][shard].append(SegmentEntry(name=name, docs=count))
                result.segments += 1
            manifest.published_log = max(log_seq(p) for p in logs)
            self._swap(manifest)
            for path in logs:
                path.unlink()
            with self._log_lock:  # now live: held through the manifest, no longer pending
                self._pending.difference_update(doc.source_id for doc in docs)
            result.inserted = len(fresh)
        return result

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
        """Make `manifest` current, then remove the files the old one named and the new one does not."""
        with self._state_lock:
            old = self.manifest
            manifest.generation = old.generation + 1
            write_manifest(self.root, manifest)
            self.manifest = manifest
        now = {(t, s, e.name) for t, s, e in manifest.entries()} | {
            (t, s, e.tombstone) for t, s, e in manifest.entries() if e.tombstone
        }
        for t, s, entry in old.entries():
            for name in (entry.name, entry.tombstone):
                if name and (t, s, name) not in now:
                    path = self._shard_dir(t, s) / name
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(path) if path.is_dir() else path.unlink()

    def delete(self, source_ids: Sequence[bytes]) -> list[bool]:
        """Tombstone every live document with one of `source_ids`; True per id that was deleted."""
        self._require_writable()
        with self._write_lock:
            self.publish()
            deleted = [False] * len(source_ids)
            manifest = Manifest.from_json(self.manifest.to_json())
            changed = False
            for view in self.snapshot().views:
                found = view.reader.find(source_ids)
                hits = [(i, int(d)) for i, d in enumerate(found) if d >= 0 and view.live[d]]
                if not hits:
                    continue
                dead = ~view.live.copy()
                for i, doc in hits:
                    dead[doc] = True
                    deleted[i] = True
                entry = next(e for e in manifest.trees[view.tree][view.shard] if e.name == view.entry.name)
                entry.tombstone = manifest.new_name("tomb") + ".npy"
                entry.deleted = int(dead.sum())
                path = self._shard_dir(view.tree, view.shard) / entry.tombstone
                with open(path, "wb") as out:
                    np.save(out, np.packbits(dead, bitorder="little"))
                    out.flush()
                    os.fsync(out.fileno())
                changed = True
            if changed:
                self._swap(manifest)
            self.catalog.forget_documents(list(source_ids))
            return deleted

    def delete_paths(self, paths: Sequence[str]) -> list[PathDeletion]:
        """Forget each (canonical) path; a document goes when the last of its paths goes."""
        self._require_writable()
        with self._write_lock:
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

    def compact(self, full: bool = False) -> CompactResult:
        """Rewrite segments: all of a shard into one (`full`), or the size-tiered choice (automatic)."""
        self._require_writable()
        result = CompactResult()
        with self._write_lock:
            self.publish()
            snapshot = self.snapshot()
            views = {(v.tree, v.shard, v.entry.name): v for v in snapshot.views}
            manifest = Manifest.from_json(self.manifest.to_json())
            for t, shards in enumerate(manifest.trees):
                for s, segments in enumerate(shards):
                    for group in compaction.plan_shard(segments, full):
                        parts = [
                            SegmentPart(views[(t, s, e.name)].reader, views[(t, s, e.name)].live)
                            for e in group
                        ]
                        live = sum(p.size for p in parts)
                        names = {e.name for e in group}
                        survivors = [e for e in segments if e.name not in names]
                        if live:
                            name = manifest.new_name("seg")
                            build_segment(self._shard_dir(t, s) / name, parts, self.policy)
                            survivors.append(SegmentEntry(name=name, docs=live))
                            result.written += 1
                        segments[:] = survivors
                        result.rewritten += len(group)
                        result.purged_docs += sum(e.deleted for e in group)
            if result.rewritten:
                self._swap(manifest)
        return result

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
            "generation": snapshot.generation,
            "policy": self.policy.describe(),
        }
