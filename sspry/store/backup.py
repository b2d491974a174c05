"""A consistent copy of a live forest (`sspry local backup`), taken while a server or an index may be
writing it; it takes no lock and never blocks the writer.

The steps, each consistent with those before it:
  1. the policy;
  2. the ingest logs as they are now: every row acknowledged before the backup started is in one of
     them (a row being appended is at most a torn last frame, which reading drops) or, once published,
     in a segment of any manifest read later;
  3. the file catalog, through SQLite's backup API: one consistent snapshot of it;
  4. a manifest, and the segments, tombstones and quarantine entries it covers: hard links when the
     destination is on the same filesystem (they are immutable, so a link is as good as a copy), else
     copies. If a compaction or a delete removes one before it is linked, the manifest is read again;
  5. the copied logs that manifest has already published are dropped, and the manifest is written
     last: a destination without one is not a forest, so an interrupted backup is visibly incomplete.

The copy is a forest of its own, as of that manifest's generation plus what the copied logs hold:
open it, search it, serve it (a writer publishes the logs).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sspry.store import diskio
from sspry.store.errors import ForestError
from sspry.store.filenames import (
    CATALOG_FILE,
    INGEST_DIR,
    MANIFEST,
    POLICY_FILE,
    QUARANTINE_DIR,
    TREES_DIR,
    log_seq,
    logs_in,
    shard_path,
)
from sspry.store.files import FileCatalog
from sspry.store.manifest import Manifest, read_manifest, write_manifest

ATTEMPTS = 20


@dataclass
class BackupResult:
    generation: int = 0
    documents: int = 0  # live documents of the copied manifest
    segments: int = 0
    logs: int = 0  # unpublished ingest logs copied
    linked_files: int = 0
    copied_bytes: int = 0
    manifest_reads: int = 0  # more than one: a writer removed a file the backup was about to link


class _Copier:
    def __init__(self, link: bool, result: BackupResult):
        self.link = link
        self.result = result

    def file(self, source: Path, target: Path) -> None:
        """Link `source` at `target`, or copy it (fsynced) when linking is not possible here."""
        if self.link:
            try:
                os.link(source, target)
                self.result.linked_files += 1
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.link = False  # another filesystem: copy from now on
        self.copy(source, target)

    def copy(self, source: Path, target: Path) -> None:
        with open(source, "rb") as reader, diskio.OutFile(target, exclusive=True) as out:
            while block := reader.read(8 << 20):
                out.write(block)
            out.sync()
        self.result.copied_bytes += os.path.getsize(target)

    def tree(self, source: Path, target: Path) -> None:
        """A directory of files (a segment, a quarantine entry), each linked or copied."""
        diskio.make_dirs(target)
        for child in sorted(source.iterdir()):
            self.file(child, target / child.name)
        diskio.fsync_path(target)


def backup(root: Path, dest: Path, link: bool = True) -> BackupResult:
    """Copy the forest at `root` into `dest` (absent, or an empty directory) consistently."""
    root, dest = Path(root), Path(dest)
    if not (root / MANIFEST).is_file() or not (root / POLICY_FILE).is_file():
        raise ForestError(f"{root} is not an initialised sspry forest")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ForestError(f"{dest} exists and is not an empty directory")
    result = BackupResult()
    copier = _Copier(link, result)
    diskio.make_dirs(dest / INGEST_DIR)
    diskio.make_dirs(dest / TREES_DIR)
    diskio.atomic_write(dest / POLICY_FILE, (root / POLICY_FILE).read_bytes(), "backup")
    logs = {}
    for log in logs_in(root):
        try:
            copier.copy(log, dest / INGEST_DIR / log.name)
        except FileNotFoundError:
            continue  # published and removed meanwhile: its rows are in any manifest read from now on
        logs[log_seq(log)] = dest / INGEST_DIR / log.name
    source_catalog = FileCatalog(root / CATALOG_FILE, readonly=True)
    try:
        source_catalog.backup(dest / CATALOG_FILE)
    finally:
        source_catalog.close()
    diskio.fsync_path(dest)
    manifest = _copy_manifest_files(root, dest, copier)
    for seq, copy in logs.items():
        if seq <= manifest.published_log:
            copy.unlink()
        else:
            result.logs += 1
    diskio.fsync_path(dest / INGEST_DIR)
    write_manifest(dest, manifest)
    result.generation = manifest.generation
    result.documents = sum(entry.live for _, _, entry in manifest.entries())
    result.segments = sum(1 for _ in manifest.entries())
    return result


def _copy_manifest_files(root: Path, dest: Path, copier: _Copier) -> Manifest:
    """Link or copy what one manifest names; read it again if a writer removed a file meanwhile."""
    for _ in range(ATTEMPTS):
        manifest = read_manifest(root)
        copier.result.manifest_reads += 1
        try:
            for t, s, entry in manifest.entries():
                shard = shard_path(t, s)
                copier.tree(root / shard / entry.name, dest / shard / entry.name)
                if entry.tombstone:
                    copier.file(root / shard / entry.tombstone, dest / shard / entry.tombstone)
            quarantine = root / QUARANTINE_DIR
            for entry in sorted(quarantine.glob("q_*")) if quarantine.is_dir() else []:
                if int(entry.name[2:]) <= manifest.published_log:
                    copier.tree(entry, dest / QUARANTINE_DIR / entry.name)
        except FileNotFoundError:
            for directory in (dest / TREES_DIR, dest / QUARANTINE_DIR):
                shutil.rmtree(directory, ignore_errors=True)
            diskio.make_dirs(dest / TREES_DIR)
            continue
        for directory, _, _ in os.walk(dest / TREES_DIR):
            diskio.fsync_path(Path(directory))
        return manifest
    raise ForestError(f"{root} changed under the backup {ATTEMPTS} times in a row: try again")
