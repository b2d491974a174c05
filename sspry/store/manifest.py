"""The manifest: the one file that says which segments and tombstones make up the Forest right now.

Writers build new files first, then swap the manifest atomically (write temp, fsync, rename, fsync the
directory); readers take a snapshot of it and never wait for writers. Files the manifest does not name
are garbage from an interrupted writer and are removed when a writer opens the Forest.

`format` is the manifest's format version (MANIFEST_FORMAT). Manifests written before it existed have
no such field and are format 1, the same layout: they are read as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sspry.store.diskio import atomic_write
from sspry.store.errors import ForestError, format_error
from sspry.store.filenames import MANIFEST

MANIFEST_FORMAT = 1


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
    format: int = MANIFEST_FORMAT
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

    def copy(self) -> Manifest:
        return Manifest.from_json(self.to_json())

    @classmethod
    def from_json(cls, text: str, path: Path = Path(MANIFEST)) -> Manifest:
        data = json.loads(text)
        found = data.setdefault("format", 1)
        if found != MANIFEST_FORMAT:
            raise format_error(path, "manifest", found, MANIFEST_FORMAT)
        try:
            trees = [[[SegmentEntry(**e) for e in shard] for shard in tree] for tree in data.pop("trees")]
            return cls(trees=trees, **data)
        except (KeyError, TypeError) as exc:
            raise ForestError(f"{path}: not a manifest sspry can read ({exc})") from None


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    return Manifest.from_json(path.read_text(encoding="utf-8"), path)


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write(root / MANIFEST, manifest.to_json().encode(), "manifest")
