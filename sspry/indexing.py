"""Indexing, one pipeline for a local Forest and for servers: walk the paths, pass over files already
indexed and unchanged, extract the rest on worker threads, and hand documents in batches to a `Sink`
on a background thread (extraction runs ahead of the writes), then let the sink finish (publish).

Interrupting (setting `stop`) starts no further file; the files being extracted are finished and
written, the sink finishes, and the summary says `interrupted`. Everything written is kept, and a
re-run passes over it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sspry.document import Document, path_key
from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.store.ingest_log import IngestResult

if TYPE_CHECKING:
    from sspry.features.walk import FoundFile, SkippedFile
    from sspry.store.forest import Forest

BATCH_DOCS = 256
BATCH_BYTES = 32 << 20
KNOWN_BATCH = 4096  # files asked about per `known` call


class Sink(Protocol):
    """Where extracted documents go: a local Forest (`ForestSink`) or servers (`client.cluster`)."""

    policy: Policy

    def known(self, stamps: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        """Per (path key, size, mtime_ns): already indexed and unchanged."""
        ...

    def put(self, docs: list[Document]) -> IngestResult:
        """Make the documents durable (or recognise them as duplicates); returns what it did."""
        ...

    def finish(self) -> None:
        """Make everything put searchable."""
        ...


@dataclass
class IndexSummary:
    """What an index run did; `counts()` is what the CLI prints."""

    submitted_documents: int = 0  # documents extracted and handed to the forest or servers
    processed_documents: int = 0  # inserted + duplicates
    inserted_documents: int = 0  # new documents, searchable when the run returns
    duplicate_documents: int = 0  # contents already indexed (their paths were recorded)
    already_indexed_files: int = 0  # unchanged files indexed by an earlier run: not read again
    skipped_files: int = 0  # files that could not be indexed (see problems)
    input_bytes: int = 0  # bytes of the files read
    elapsed_s: float = 0.0
    interrupted: bool = False
    servers: dict[str, dict[str, int]] = field(default_factory=dict)  # per server: inserted, duplicates
    offline_servers: list[str] = field(default_factory=list)  # skipped with ignore_offline
    problems: list[SkippedFile] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def counts(self) -> dict:
        out = {
            "submitted_documents": self.submitted_documents,
            "processed_documents": self.processed_documents,
            "inserted_documents": self.inserted_documents,
            "duplicate_documents": self.duplicate_documents,
            "already_indexed_files": self.already_indexed_files,
            "skipped_files": self.skipped_files,
            "input_bytes": self.input_bytes,
            "elapsed_s": round(self.elapsed_s, 3),
            "mb_per_s": round(self.mb_per_s, 2),
        }
        if self.servers:
            out["servers"] = self.servers
        if self.offline_servers:
            out["offline_servers"] = self.offline_servers
        if self.interrupted:
            out["interrupted"] = True
        return out


class ForestSink:
    """Documents into a local Forest, published whenever much is waiting and at the end."""

    def __init__(self, forest: Forest):
        self.forest = forest
        self.policy = forest.policy

    def known(self, stamps: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        return self.forest.known_files(stamps)

    def put(self, docs: list[Document]) -> IngestResult:
        from sspry.store.forest import PUBLISH_BYTES

        result = self.forest.ingest(docs)
        if self.forest.pending_bytes >= PUBLISH_BYTES:
            self.forest.publish()
        return result

    def finish(self) -> None:
        self.forest.publish()
        self.forest.compact(full=False)


def _unknown(sink: Sink, files: list[FoundFile], stop: threading.Event) -> list[FoundFile]:
    """The files the sink does not already hold unchanged."""
    fresh: list[FoundFile] = []
    for start in range(0, len(files), KNOWN_BATCH):
        if stop.is_set():
            return fresh
        part = files[start : start + KNOWN_BATCH]
        stamps = [(path_key(os.path.realpath(f.path)), f.size, f.mtime_ns) for f in part]
        fresh.extend(f for f, known in zip(part, sink.known(stamps), strict=True) if not known)
    return fresh


class _Writer:
    """Runs sink.put on a background thread, two batches behind the extraction at most."""

    def __init__(self, sink: Sink, summary: IndexSummary):
        self.sink = sink
        self.summary = summary
        self.failure: BaseException | None = None
        self._queue: queue.Queue[list[Document] | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="sspry-index-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.failure is not None:
                continue
            try:
                result = self.sink.put(batch)
            except BaseException as exc:  # reported by the caller's thread
                self.failure = exc
                continue
            self.summary.submitted_documents += len(batch)
            self.summary.inserted_documents += result.inserted
            self.summary.duplicate_documents += result.duplicates

    def put(self, batch: list[Document]) -> None:
        self._queue.put(batch)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def index_files(
    sink: Sink,
    paths: Iterable[str],
    *,
    path_list: bool = False,
    workers: int = 0,
    batch_bytes: int = BATCH_BYTES,
    progress: Progress = SILENT,
    stop: threading.Event | None = None,
) -> IndexSummary:
    """Index every file under `paths` into `sink`; problems are collected in the summary (and noted)."""
    from sspry.features.extract import default_workers, extract_many, warm_kernels  # compiled kernels
    from sspry.features.walk import walk

    started = time.perf_counter()
    stop = stop or threading.Event()
    summary = IndexSummary()

    def skip(problem: SkippedFile) -> None:
        summary.problems.append(problem)
        progress.note(f"skipped: {problem}")

    found = walk(paths, path_list)
    for problem in found.problems:
        skip(problem)
    files = _unknown(sink, found.files, stop)
    summary.already_indexed_files = len(found.files) - len(files)
    if files:
        warm_kernels(sink.policy)  # a first run compiles here, announced, before the progress bar
    writer = _Writer(sink, summary)
    batch: list[Document] = []
    size = 0
    try:
        with progress.stage("indexing", sum(f.size for f in files), "B") as bar:
            extracted = extract_many((f.path for f in files), sink.policy, workers or default_workers(), stop)
            for (_, doc, problem), file in zip(extracted, files, strict=False):  # fewer once stopped
                bar.advance(file.size)
                if writer.failure is not None:
                    stop.set()
                if problem is not None:
                    skip(problem)
                    continue
                assert doc is not None
                summary.input_bytes += doc.filesize
                batch.append(doc)
                size += len(doc.tier1) + len(doc.tier2)
                if len(batch) >= BATCH_DOCS or size >= batch_bytes:
                    writer.put(batch)
                    batch, size = [], 0
            if batch:
                writer.put(batch)
    finally:
        writer.close()
    if writer.failure is not None:
        raise writer.failure
    sink.finish()
    summary.interrupted = stop.is_set()
    summary.processed_documents = summary.inserted_documents + summary.duplicate_documents
    summary.skipped_files = len(summary.problems)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def index_paths(
    forest: Forest,
    paths: Iterable[str],
    path_list: bool = False,
    workers: int = 0,
    progress: Progress = SILENT,
    stop: threading.Event | None = None,
) -> IndexSummary:
    """Index every file under `paths` into a local Forest and publish."""
    return index_files(
        ForestSink(forest), paths, path_list=path_list, workers=workers, progress=progress, stop=stop
    )
