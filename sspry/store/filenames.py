"""Every name in a Forest's root, in one place (leveldb's filename.h). A segment's own files are named by
the segment format (segment/format.py).

  <root>/sspry.json                        the policy, fixed at init
  <root>/manifest.json                     which segments and tombstones are current (atomic swap)
  <root>/files.sqlite                      the file catalog (store/files.py)
  <root>/plans/                            the planner's plan cache: derived data, safe to delete
  <root>/ingest/log_NNNNNNNNNN.bin         durable ingest logs not yet published
  <root>/trees/tree_NNNN/shard_NNN/seg_NNNNNNNNNN/       segments
  <root>/trees/tree_NNNN/shard_NNN/tomb_NNNNNNNNNN.npy   tombstone bitmaps (one per segment version)
  <root>/quarantine/q_NNNNNNNNNN/          rows a publish set aside, with their report
  <root>/.lock                             held (flock) by the one process allowed to write
  .tmp-*                                   anything being written, renamed into place once complete
"""

from __future__ import annotations

from pathlib import Path

POLICY_FILE = "sspry.json"
MANIFEST = "manifest.json"
CATALOG_FILE = "files.sqlite"
PLANS_DIR = "plans"
INGEST_DIR = "ingest"
TREES_DIR = "trees"
QUARANTINE_DIR = "quarantine"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"

LOG_PREFIX, LOG_SUFFIX = "log_", ".bin"
SEGMENT_PREFIX, TOMBSTONE_PREFIX, TOMBSTONE_SUFFIX = "seg", "tomb", ".npy"


def log_name(seq: int) -> str:
    return f"{LOG_PREFIX}{seq:010d}{LOG_SUFFIX}"


def log_seq(path: Path) -> int:
    return int(path.name[len(LOG_PREFIX) : -len(LOG_SUFFIX)])


def logs_in(root: Path) -> list[Path]:
    """The ingest logs of a forest, oldest first."""
    return sorted((root / INGEST_DIR).glob(f"{LOG_PREFIX}*{LOG_SUFFIX}"), key=log_seq)


def shard_dir(root: Path, tree: int, shard: int) -> Path:
    return root / shard_path(tree, shard)


def shard_path(tree: int, shard: int) -> Path:
    """A shard's directory relative to the root."""
    return Path(TREES_DIR) / f"tree_{tree:04d}" / f"shard_{shard:03d}"


def shard_dirs(root: Path) -> list[Path]:
    return sorted((root / TREES_DIR).glob("tree_*/shard_*"))


def quarantine_entry(root: Path, published_log: int) -> Path:
    return root / QUARANTINE_DIR / f"q_{published_log:010d}"
