"""Several servers, each owning its own Forest, used as one: discovery, policy checks, routing and
merging. Nothing cluster-like beyond that: index routes each batch to the server with the fewest
documents; search, delete and info go to every server and merge.

Indexing and deleting run the engine's own pipelines (`sspry.indexing`, `sspry.deleting`) with the
servers as their sink and backend, so local and remote runs count and report the same way.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sspry.client.connection import ClientError, Connection, OfflineError, parse_addrs
from sspry.deleting import Deletion, delete_values
from sspry.document import Document, paired_stamps
from sspry.engines import DEFAULT_ENGINE
from sspry.indexing import IndexSummary, index_files
from sspry.policy import Policy
from sspry.progress import SILENT, Progress, Stage
from sspry.query.externals import Externals
from sspry.query.literals import DEFAULT_MAX_ANCHORS
from sspry.query.results import (
    RuleResult,
    SearchResult,
    SearchStream,
    attach_paths,
    effective_limit,
    rule_result,
)
from sspry.query.rules import RulePaths, RuleText, load_for_search
from sspry.store.files import SHOWN_PATHS, PathDeletion, PathsOf
from sspry.store.ingest_log import IngestResult
from sspry.v1 import sspry_pb2
from sspry.wire import externals_to_proto, file_stamp, namespaces_to_proto, policy_from_proto

if TYPE_CHECKING:
    from sspry.query.rulecheck import RuleReport

DEFAULT_BATCH_BYTES = 32 << 20


@dataclass
class Member:
    connection: Connection
    policy: Policy
    documents: int
    inserted: int = 0  # new documents this run gave it (for routing and the summary)
    duplicates: int = 0  # documents of this run it already held


class Cluster:
    def __init__(
        self,
        addrs: list[str],
        *,
        ignore_offline: bool = False,
        progress: Progress = SILENT,
        **connection_options,
    ):
        self.addrs = addrs
        self.ignore_offline = ignore_offline
        self.progress = progress
        self.connections = [Connection(addr, **connection_options) for addr in addrs]
        self.offline: list[str] = []
        self.policy: Policy | None = None  # the servers' policy, once discovered

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _each(self, call, connections: list[Connection] | None = None) -> list[tuple[Connection, object]]:
        """Run call(connection) on every server concurrently; offline servers are skipped (and named)
        with ignore_offline and are an error otherwise. Results in address order."""
        connections = self.connections if connections is None else connections
        results: list[tuple[Connection, object]] = []
        with ThreadPoolExecutor(max_workers=max(1, len(connections))) as pool:
            futures = [(c, pool.submit(call, c)) for c in connections]
            for connection, future in futures:
                try:
                    results.append((connection, future.result()))
                except OfflineError as exc:
                    if not self.ignore_offline:
                        raise
                    if connection.addr not in self.offline:
                        self.offline.append(connection.addr)
                        self.progress.note(f"skipped offline server: {exc}")
        if not results:
            raise ClientError("no server answered")
        return results

    def discover(self) -> list[Member]:
        """Every reachable server with its policy; their policies must match."""
        members = [
            Member(c, policy_from_proto(info.policy), info.documents)
            for c, info in self._each(lambda c: c.info())
        ]
        self._agreed([(m.connection.addr, m.policy) for m in members])
        return members

    def _agreed(self, policies: list[tuple[str, Policy]]) -> Policy:
        """The servers' one policy (kept as `self.policy`), or ClientError naming two that differ."""
        first_addr, first = policies[0]
        for addr, policy in policies[1:]:
            if policy != first:
                raise ClientError(
                    f"servers disagree on the policy: {first_addr} has {first.describe()}, "
                    f"{addr} has {policy.describe()}"
                )
        self.policy = first
        return first

    # --- index -------------------------------------------------------------------------------------
    def index(
        self,
        paths: Iterable[str],
        *,
        path_list: bool = False,
        workers: int = 0,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        progress: Progress = SILENT,
        stop: threading.Event | None = None,
    ) -> IndexSummary:
        """Extract locally, send each batch's new documents to the server with the fewest documents,
        publish. The summary counts, per server and in total, what the servers took."""
        sink = _ClusterSink(self, self.discover())
        summary = index_files(
            sink,
            paths,
            path_list=path_list,
            workers=workers,
            batch_bytes=batch_bytes,
            progress=progress,
            stop=stop,
        )
        summary.servers = {
            m.connection.addr: {"inserted": m.inserted, "duplicates": m.duplicates} for m in sink.members
        }
        summary.offline_servers = list(self.offline)
        return summary

    # --- search ------------------------------------------------------------------------------------
    def search(
        self,
        rule: RuleText | None = None,
        path: RulePaths | None = None,
        *,
        verify: bool = False,
        details: Collection[str] = (),
        engine: str = DEFAULT_ENGINE,
        max_candidates: float = 0.0,
        max_anchors: int = DEFAULT_MAX_ANCHORS,
        limit: int | None = None,
        count_only: bool = False,
        externals: Externals | None = None,
        progress: Progress | None = None,
    ) -> SearchResult:
        """Every document that may match each public rule of the rule text (`rule=`) or files (`path=`;
        both as Database.search takes them),
        on every server (merged, deduplicated, then capped); with `verify`, each candidate scanned with
        YARA here (its recorded paths must be readable), keeping of each match the `details` asked
        ("strings", "tags", "meta"); `engine`: "yara" (yara-python) or "yara-x"."""
        from sspry.verify import check_options, collect

        progress = progress or SILENT
        started = time.perf_counter()
        check_options(verify, details, engine)  # before any work
        stream = self.stream(
            rule,
            path,
            max_candidates=max_candidates,
            max_anchors=max_anchors,
            limit=limit,
            count_only=count_only,
            externals=externals,
            progress=progress,
        )
        assert self.policy is not None  # discovered by stream()
        return collect(stream, self.policy, verify, progress, started, details, engine)

    def stream(
        self,
        rule: RuleText | None = None,
        path: RulePaths | None = None,
        *,
        max_candidates: float = 0.0,
        max_anchors: int = DEFAULT_MAX_ANCHORS,
        limit: int | None = None,
        count_only: bool = False,
        externals: Externals | None = None,
        progress: Progress | None = None,
    ) -> SearchStream:
        """`search` without verification, rule by rule as the servers answer: a rule is given out once
        every server has sent it, so memory stays flat whatever the number of candidates. The rules are
        compiled here first (RuleError if YARA refuses them), and sent with their includes inlined."""
        progress = progress or SILENT
        source, compile_ms = load_for_search(rule, path, progress.note, externals)
        # the first call asks each server for its policy (bounded by the client's timeout, which finds
        # offline servers quickly); later searches learn it from their answers' first frame, one round
        # trip less (1.75 of 5.1 ms for a single rule at 3,000 documents)
        connections = self.connections if self.policy is not None else [m.connection for m in self.discover()]
        targets = list(source.targets)
        request = sspry_pb2.SearchRequest(
            max_anchors=max_anchors,
            limit=limit or 0,
            count_only=count_only,
            externals=externals_to_proto(source.externals),
            **namespaces_to_proto((ns.name, ns.text, list(ns.targets)) for ns in source.namespaces),
        )
        stage = progress.stage("planning (servers)", len(targets) * len(connections), "rule")
        answers = [a for _, a in self._each(lambda c: _Answer(c, request, stage), connections)]
        try:
            self._agreed([(a.connection.addr, a.policy) for a in answers])
        except ClientError:
            stage.close()
            for answer in answers:
                answer.cancel()
            raise
        documents = sum(a.documents for a in answers)
        cap = 0 if count_only else effective_limit(documents, max_candidates, limit)
        stream = SearchStream(targets, documents, {"compile": compile_ms})
        stream.source = source
        stream.servers = [a.connection.addr for a in answers]
        stream.offline = list(self.offline)

        def rules() -> Iterator[RuleResult]:
            try:
                for index, name in enumerate(targets):
                    ids: list[bytes] = []
                    count = 0
                    notes: dict[str, None] = {}
                    for answer in answers:
                        found, total, codes = answer.rule(index)
                        ids.extend(found)
                        count += total
                        notes.update(dict.fromkeys(codes))
                    result = rule_result(name, ids, cap, count)
                    result.notes = list(notes)
                    if count_only:
                        result.truncated, result.limit, result.counted_only = False, None, True
                    attach_paths([result], lambda wanted: _merge_paths(answers, wanted))
                    yield result
                for answer in answers:
                    answer.finish()
                stream.timings_ms["plan"] = max(a.plan_ms for a in answers)
                stream.timings_ms["search"] = max(a.search_ms for a in answers)
            finally:
                stage.close()
                for answer in answers:
                    answer.cancel()

        return stream.feed(rules())

    def check(
        self,
        rule: RuleText | None = None,
        path: RulePaths | None = None,
        *,
        max_anchors: int = DEFAULT_MAX_ANCHORS,
        externals: Externals | None = None,
    ) -> list[RuleReport]:
        """How each rule would be searched with the servers' policy (`sspry rule-check`)."""
        from sspry.query.rulecheck import check_rules

        return check_rules(self.discover()[0].policy, max_anchors, rule=rule, path=path, externals=externals)

    # --- delete, info, shutdown --------------------------------------------------------------------
    def delete(self, values: list[str]) -> list[Deletion]:
        """Delete VALUES (see sspry.deleting) on every server."""
        return delete_values(_ClusterDeleter(self, self.discover()), values)

    def info(self) -> list[dict]:
        out = []
        for connection, reply in self._each(lambda c: c.info()):
            data = json.loads(reply.json)
            data["addr"] = connection.addr
            out.append(data)
        return out

    def shutdown(self) -> list[tuple[str, str]]:
        return [(c.addr, message) for c, message in self._each(lambda c: c.shutdown())]


class _ClusterSink:
    """The index pipeline's sink over servers: a document some server holds is a duplicate there (and
    that server records its file); the rest of a batch goes to the server with the fewest documents."""

    def __init__(self, cluster: Cluster, members: list[Member]):
        self.cluster = cluster
        self.members = members
        self.policy = members[0].policy
        self._connections = [m.connection for m in members]

    def known(self, stamps: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        files = [sspry_pb2.FileStamp(path_key=k, size=s, mtime_ns=m) for k, s, m in stamps]
        answers = self.cluster._each(lambda c: c.known_files(files), self._connections)
        return [any(known[i] for _, known in answers) for i in range(len(stamps))]

    def put(self, docs: list[Document]) -> IngestResult:
        ids = [doc.source_id for doc in docs]
        files = [file_stamp(doc) for doc in docs]
        answers = dict(self.cluster._each(lambda c: c.exists(ids, files), self._connections))
        result = IngestResult()
        fresh = []
        for i, doc in enumerate(docs):
            holder = next(
                (m for m in self.members if m.connection in answers and answers[m.connection][i]), None
            )
            if holder is None:
                fresh.append(doc)
            else:
                holder.duplicates += 1
                result.duplicates += 1
        if fresh:
            target = min(self.members, key=lambda m: m.documents + m.inserted)
            reply = target.connection.insert([doc.to_row() for doc in fresh])
            target.inserted += reply.inserted
            target.duplicates += reply.duplicates
            result += IngestResult(reply.inserted, reply.duplicates)
        return result

    def finish(self) -> None:
        touched = [m.connection for m in self.members if m.inserted]
        if touched:
            self.cluster._each(lambda c: c.publish(), touched)


class _ClusterDeleter:
    def __init__(self, cluster: Cluster, members: list[Member]):
        self.cluster = cluster
        self.policy = members[0].policy
        self._connections = [m.connection for m in members]

    def delete_ids(self, source_ids: list[bytes]) -> list[list[str]]:
        if not source_ids:
            return []
        answers = self.cluster._each(lambda c: c.delete(source_ids, []), self._connections)
        return [[c.addr for c, reply in answers if reply.deleted[i]] for i in range(len(source_ids))]

    def delete_paths(self, paths: list[str]) -> list[list[tuple[str, PathDeletion]]]:
        if not paths:
            return []
        answers = self.cluster._each(lambda c: c.delete([], paths), self._connections)
        out = []
        for i, path in enumerate(paths):
            found = []
            for connection, reply in answers:
                match = reply.by_path[i]
                if match.source_id:
                    deletion = PathDeletion(
                        path, bytes(match.source_id), match.document_deleted, match.remaining_paths
                    )
                    found.append((connection.addr, deletion))
            out.append(found)
        return out


class _Answer:
    """One server's side of a search: its frames read on a thread (a bounded queue ahead of the
    reader), taken rule by rule."""

    def __init__(self, connection: Connection, request: sspry_pb2.SearchRequest, stage: Stage):
        self.connection = connection
        self.paths: dict[bytes, PathsOf] = {}
        self.plan_ms = self.search_ms = 0.0
        self._stage = stage
        self._planned = 0
        self._frames: queue.Queue = queue.Queue(maxsize=64)
        self._call = connection.search(request)
        threading.Thread(target=self._read, name=f"sspry-search {connection.addr}", daemon=True).start()
        first = self._next()
        if first.WhichOneof("frame") != "start":
            raise ClientError(f"server {connection.addr}: the search did not start with its document count")
        self.documents = first.start.documents  # the server answered: it is not offline
        start = first.start if first.start.HasField("policy") else connection.info()  # an older server
        self.policy = policy_from_proto(start.policy)

    def _read(self) -> None:
        try:
            for frame in self._call:
                self._frames.put(frame)
            self._frames.put(None)
        except BaseException as exc:  # handed to the consumer
            self._frames.put(exc)

    def _next(self):
        """The next frame that is not progress (progress goes to the stage); each silence of the
        connection's timeout is answered by `Connection.after_silence`."""
        while True:
            try:
                frame = self._frames.get(timeout=self.connection.timeout)
            except queue.Empty:
                self.connection.after_silence(self._call)
                continue
            if isinstance(frame, BaseException):
                raise frame
            if frame is None:
                raise ClientError(f"server {self.connection.addr}: the search ended early")
            if frame.WhichOneof("frame") != "progress":
                return frame
            self._stage.advance(frame.progress.done - self._planned)
            self._planned = frame.progress.done

    def rule(self, index: int) -> tuple[list[bytes], int, list[str]]:
        """Rule `index`'s candidates sent by this server, its candidate count here, its plan's notes."""
        ids: list[bytes] = []
        while True:
            frame = self._next()
            kind = frame.WhichOneof("frame")
            if kind == "paths":
                for doc in frame.paths.documents:
                    self.paths[doc.source_id] = PathsOf(tuple(doc.paths), doc.path_count, _stamps(doc))
            elif kind == "candidates" and frame.candidates.rule == index:
                ids.extend(frame.candidates.source_ids)
                if frame.candidates.rule_end:
                    return ids, frame.candidates.count, list(frame.candidates.notes)
            else:
                raise ClientError(f"server {self.connection.addr}: unexpected {kind} frame for rule {index}")

    def finish(self) -> None:
        frame = self._next()
        if frame.WhichOneof("frame") != "summary":
            raise ClientError(f"server {self.connection.addr}: the search did not end with its summary")
        self.plan_ms, self.search_ms = frame.summary.plan_ms, frame.summary.search_ms

    def cancel(self) -> None:
        self._call.cancel()


def _merge_paths(answers: list[_Answer], wanted: list[bytes]) -> dict[bytes, PathsOf]:
    """The recorded paths of `wanted` documents, from every server that holds them."""
    merged: dict[bytes, PathsOf] = {}
    for answer in answers:
        for source_id in wanted:
            paths = answer.paths.get(source_id)
            if paths is None:
                continue
            before = merged.get(source_id)
            if before is None:
                merged[source_id] = paths
            else:
                stamped = dict(_stamped(before))
                for path, stamp in _stamped(paths):
                    stamped.setdefault(path, stamp)
                shown = list(stamped.items())[:SHOWN_PATHS]
                merged[source_id] = PathsOf(
                    tuple(p for p, _ in shown), before.count + paths.count, tuple(s for _, s in shown)
                )
    return merged


def _stamps(doc: sspry_pb2.CandidatePaths) -> tuple[tuple[int, int], ...]:
    """Each path's stamp as the server sent it; none (so never trusted) from an older server, or when
    the counts do not match the paths'."""
    if not len(doc.sizes) == len(doc.mtimes_ns) == len(doc.paths):
        return ()
    return tuple(zip(doc.sizes, doc.mtimes_ns, strict=True))


def _stamped(paths: PathsOf) -> zip:
    """(path, stamp) pairs of `paths` (document.paired_stamps: none trusted from a server that sent none)."""
    return zip(paths.paths, paired_stamps(paths.paths, paths.stamps), strict=True)


def connect(
    addrs: str | list[str] | None = None,
    *,
    token: str | None = None,
    tls_ca: bytes | str | os.PathLike | None = None,
    timeout: float = 30.0,
    max_message_bytes: int = 64 << 20,
    ignore_offline: bool = False,
    progress: Progress | None = None,
) -> Cluster:
    """Servers used as one: `addrs` is "host:port,host:port" (or a list; default $SSPRY_ADDR or
    127.0.0.1:17653); `tls_ca` the CA certificate (PEM bytes, or a file) when the servers use TLS. The
    connection is made by the first call; ValueError for an address that is not one."""
    if isinstance(addrs, list):
        addrs = ",".join(addrs)
    if tls_ca is not None and not isinstance(tls_ca, bytes):
        tls_ca = Path(tls_ca).read_bytes()
    return Cluster(
        parse_addrs(addrs),
        ignore_offline=ignore_offline,
        progress=progress or SILENT,
        token=token,
        tls_ca=tls_ca,
        timeout=timeout,
        max_message_bytes=max_message_bytes,
    )
