"""The manifest: the one file that says which segments and tombstones make up the Forest right now.

Writers build new files first, then swap the manifest atomically (write temp, fsync, rename, fsync the
directory); readers take a snapshot of it and never wait for writers. Files the manifest does not name
are garbage from an interrupted writer and are removed when a writer opens the Forest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sspry.store.diskio import atomic_write

MANIFEST = "manifest.json"


@dataclass
class SegmentEntry:
    name: str
    docs: int
    deleted: int = 0
    tombstone: str | None = None  # file in the shard directory holding the packed deleted-bitmap

    @property
    def live(self) -> int:
        return self.docs - self.deleted


@dataclass
class Manifest:
    generation: int = 0
    next_id: int = 1  # names new segments and tombstones, never reused
    published_log: int = 0  # ingest logs with a sequence number <= this are already in segments
    trees: list[list[list[SegmentEntry]]] = field(default_factory=list)  # tree -> shard -> segments

    def new_name(self, prefix: str) -> str:
        name = f"{prefix}_{self.next_id:010d}"
        self.next_id += 1
        return name

    def entries(self):
        """(tree, shard, entry) for every segment."""
        for t, shards in enumerate(self.trees):
            for s, segments in enumerate(shards):
                for entry in segments:
                    yield t, s, entry

    def tree_live(self, tree: int) -> int:
        return sum(e.live for shard in self.trees[tree] for e in shard)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        trees = [[[SegmentEntry(**e) for e in shard] for shard in tree] for tree in data.pop("trees")]
        return cls(trees=trees, **data)


def read_manifest(root: Path) -> Manifest:
    return Manifest.from_json((root / MANIFEST).read_text(encoding="utf-8"))


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write(root / MANIFEST, manifest.to_json().encode(), "manifest")
