"""Indexing files into a local Forest: walk, extract on worker threads, ingest in batches, publish."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sspry.features.extract import SkippedFile
    from sspry.store.forest import Forest

BATCH_DOCS = 256
BATCH_BYTES = 32 << 20


@dataclass
class IndexSummary:
    """What an index run did (local here; client.cluster adds the servers); `counts()` is what the CLI
    prints."""

    submitted_documents: int = 0
    processed_documents: int = 0
    inserted_documents: int = 0
    duplicate_documents: int = 0
    skipped_files: int = 0
    input_bytes: int = 0
    problems: list[SkippedFile] = field(default_factory=list)

    def counts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "problems"}


def index_paths(
    forest: Forest, paths: Iterable[str], path_list: bool = False, workers: int = 0, progress: bool = True
) -> IndexSummary:
    """Index every file under `paths` and publish; problems are collected (and shown on stderr)."""
    from tqdm import tqdm

    from sspry.features.extract import default_workers, extract_many, walk, warm_kernels
    from sspry.store.forest import PUBLISH_BYTES

    summary = IndexSummary()
    found = walk(paths, path_list)
    warm_kernels(forest.policy)

    def skip(problem: SkippedFile) -> None:
        summary.problems.append(problem)
        if progress:
            tqdm.write(f"skipped: {problem}", file=sys.stderr)

    for problem in found.problems:
        skip(problem)

    def publish() -> None:
        result = forest.publish()
        summary.inserted_documents += result.inserted
        summary.duplicate_documents += result.duplicates
        summary.processed_documents += result.inserted + result.duplicates

    batch, batch_bytes = [], 0
    with tqdm(
        total=len(found.files),
        unit="file",
        desc="indexing",
        disable=None if progress else True,
        file=sys.stderr,
    ) as bar:
        for _, doc, problem in extract_many(found.files, forest.policy, workers or default_workers()):
            bar.update(1)
            if problem is not None:
                skip(problem)
                continue
            summary.input_bytes += doc.filesize
            batch.append(doc)
            batch_bytes += len(doc.tier1) + len(doc.tier2)
            if len(batch) >= BATCH_DOCS or batch_bytes >= BATCH_BYTES:
                summary.submitted_documents += forest.ingest(batch)
                batch, batch_bytes = [], 0
                if forest.pending_bytes >= PUBLISH_BYTES:
                    publish()
        if batch:
            summary.submitted_documents += forest.ingest(batch)
    publish()
    forest.compact(full=False)
    summary.skipped_files = len(summary.problems)
    return summary
