"""Several servers, each owning its own Forest, used as one: discovery, policy checks, routing and
merging. Nothing cluster-like beyond that: index routes each batch to the server with the fewest
documents; search, delete and info go to every server and merge.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sspry.client.connection import ClientError, Connection, OfflineError
from sspry.indexing import IndexSummary
from sspry.policy import Policy
from sspry.query.results import Candidate, RuleResult, SearchResult, candidate_limit
from sspry.query.rules import RuleSource
from sspry.wire import policy_from_proto

BATCH_DOCS = 256
DEFAULT_BATCH_BYTES = 32 << 20


@dataclass
class Member:
    connection: Connection
    policy: Policy
    documents: int
    assigned: int = 0  # documents sent during this run, for routing


@dataclass
class RemoteIndexSummary(IndexSummary):
    servers: dict[str, int] = field(default_factory=dict)  # addr -> documents sent


class Cluster:
    def __init__(self, addrs: list[str], *, ignore_offline: bool = False, **connection_options):
        self.addrs = addrs
        self.ignore_offline = ignore_offline
        self.connections = [Connection(addr, **connection_options) for addr in addrs]
        self.offline: list[str] = []

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _each(self, call, connections: list[Connection] | None = None) -> list[tuple[Connection, object]]:
        """Run call(connection) on every server concurrently; offline servers are skipped with
        --ignore-offline and are an error otherwise. Results in address order."""
        connections = self.connections if connections is None else connections
        results: list[tuple[Connection, object]] = []
        with ThreadPoolExecutor(max_workers=max(1, len(connections))) as pool:
            futures = [(c, pool.submit(call, c)) for c in connections]
            for connection, future in futures:
                try:
                    results.append((connection, future.result()))
                except OfflineError:
                    if not self.ignore_offline:
                        raise
                    if connection.addr not in self.offline:
                        self.offline.append(connection.addr)
        if not results:
            raise ClientError("no server answered")
        return results

    def discover(self) -> list[Member]:
        """Every reachable server with its policy; their policies must match."""
        members = [
            Member(c, policy_from_proto(info.policy), info.documents)
            for c, info in self._each(lambda c: c.info())
        ]
        first = members[0]
        for member in members[1:]:
            if member.policy != first.policy:
                raise ClientError(
                    f"servers disagree on the policy: {first.connection.addr} has {first.policy.describe()}, "
                    f"{member.connection.addr} has {member.policy.describe()}"
                )
        return members

    # --- index -------------------------------------------------------------------------------------
    def index(
        self,
        paths: list[str],
        *,
        path_list: bool = False,
        workers: int = 0,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        progress: bool = True,
    ) -> RemoteIndexSummary:
        """Extract locally, upload each batch to the server with the fewest documents, publish.
        Files that could not be read are in the summary's `problems`."""
        from tqdm import tqdm

        from sspry.features.extract import default_workers, extract_many, walk, warm_kernels

        members = self.discover()
        policy = members[0].policy
        summary = RemoteIndexSummary()
        found = walk(paths, path_list)
        warm_kernels(policy)
        problems = summary.problems
        problems.extend(found.problems)
        for problem in problems:
            if progress:
                tqdm.write(f"skipped: {problem}", file=sys.stderr)
        uploads: queue.Queue = queue.Queue(maxsize=2)  # extraction runs ahead of the upload by 2 batches
        failure: list[BaseException] = []

        sent: set[bytes] = set()

        def uploader() -> None:
            while (batch := uploads.get()) is not None:
                if failure:
                    continue
                try:
                    fresh = self._not_indexed(batch, sent, members)
                    summary.duplicate_documents += len(batch) - len(fresh)
                    if fresh:
                        target = min(members, key=lambda m: m.documents + m.assigned)
                        target.connection.insert([doc.to_row() for doc in fresh])
                        target.assigned += len(fresh)
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)
                    continue
                summary.submitted_documents += len(batch)

        thread = threading.Thread(target=uploader, name="sspry-upload", daemon=True)
        thread.start()
        batch, size = [], 0
        try:
            with tqdm(
                total=len(found.files),
                unit="file",
                desc="indexing",
                disable=None if progress else True,
                file=sys.stderr,
            ) as bar:
                for _, doc, problem in extract_many(found.files, policy, workers or default_workers()):
                    bar.update(1)
                    if failure:
                        break
                    if problem is not None:
                        problems.append(problem)
                        if progress:
                            tqdm.write(f"skipped: {problem}", file=sys.stderr)
                        continue
                    summary.input_bytes += doc.filesize
                    batch.append(doc)
                    size += len(doc.tier1) + len(doc.tier2)
                    if len(batch) >= BATCH_DOCS or size >= batch_bytes:
                        uploads.put(batch)
                        batch, size = [], 0
                if batch and not failure:
                    uploads.put(batch)
        finally:
            uploads.put(None)
            thread.join()
        if failure:
            raise failure[0]
        touched = [m.connection for m in members if m.assigned]
        for _, published in self._each(lambda c: c.publish(), touched) if touched else []:
            summary.inserted_documents += published.inserted
            summary.duplicate_documents += published.duplicates
        summary.processed_documents = summary.inserted_documents + summary.duplicate_documents
        summary.skipped_files = len(problems)
        summary.servers = {m.connection.addr: m.assigned for m in members}
        return summary

    def _not_indexed(self, batch: list, sent: set[bytes], members: list[Member]) -> list:
        """The documents of a batch that neither this run nor any server has already: with several
        servers a re-indexed file could otherwise land on another server than the first time."""
        fresh = []
        for doc in batch:
            if doc.source_id not in sent:
                sent.add(doc.source_id)
                fresh.append(doc)
        if fresh:
            ids = [doc.source_id for doc in fresh]
            answers = self._each(lambda c: c.exists(ids), [m.connection for m in members])
            fresh = [doc for i, doc in enumerate(fresh) if not any(present[i] for _, present in answers)]
        return fresh

    # --- search ------------------------------------------------------------------------------------
    def search(
        self, source: RuleSource, max_candidates: float, max_anchors: int
    ) -> tuple[SearchResult, Policy]:
        """Search every server, merge per rule (first path seen kept), deduplicate, then cap."""
        started = time.perf_counter()
        members = self.discover()
        targets = list(source.targets)

        def run(connection: Connection):
            per_rule: list[list[tuple[bytes, str]]] = [[] for _ in targets]
            documents = 0
            for frame in connection.search(source.text or "", targets, max_anchors):
                if frame.HasField("summary"):
                    documents = frame.summary.documents
                else:
                    part = frame.candidates
                    per_rule[part.rule].extend(zip(part.source_ids, part.paths, strict=True))
            return per_rule, documents

        answers = self._each(run, [m.connection for m in members])
        documents = sum(docs for _, (_, docs) in answers)
        limit = candidate_limit(documents, max_candidates)
        rules = []
        for index, name in enumerate(targets):
            merged: dict[bytes, Candidate] = {}
            for _, (per_rule, _) in answers:
                for source_id, path in per_rule[index]:
                    merged.setdefault(source_id, Candidate(source_id, path or None))
            candidates = list(merged.values())
            truncated = limit is not None and len(candidates) > limit
            rules.append(
                RuleResult(
                    rule=name,
                    candidates=candidates[:limit] if truncated else candidates,
                    candidate_count=len(candidates),
                    truncated=truncated,
                    limit=limit if truncated else None,
                )
            )
        servers = [c.addr for c, _ in answers]
        return SearchResult(rules, documents, (time.perf_counter() - started) * 1000, servers), members[
            0
        ].policy

    # --- delete, info, shutdown --------------------------------------------------------------------
    def delete(self, values: list[str]) -> list[dict]:
        """Delete VALUES (files, hex Source IDs, or stored paths) on every server; a value is deleted
        if any server deleted it."""
        from sspry.document import resolve_value  # numpy: not for the other commands

        members = self.discover()
        policy = members[0].policy
        try:
            resolved = [resolve_value(value, policy) for value in values]
        except ValueError as exc:
            raise ClientError(str(exc)) from exc
        ids = [v for v in resolved if isinstance(v, bytes)]
        paths = [v for v in resolved if isinstance(v, str)]
        answers = self._each(lambda c: c.delete(ids, paths), [m.connection for m in members])
        rows = []
        for value, target in zip(values, resolved, strict=True):
            if isinstance(target, bytes):
                at = ids.index(target)
                done = [c.addr for c, reply in answers if reply.deleted[at]]
                identity = target.hex()
            else:
                at = paths.index(target)
                done = [c.addr for c, reply in answers if reply.by_path[at].source_ids]
                found = [i.hex() for _, reply in answers for i in reply.by_path[at].source_ids]
                identity = found[0] if found else None
            rows.append(
                {
                    "value": value,
                    "status": "deleted" if done else "missing",
                    "identity": identity,
                    "servers": done,
                }
            )
        return rows

    def info(self) -> list[dict]:
        out = []
        for connection, reply in self._each(lambda c: c.info()):
            data = json.loads(reply.json)
            data["addr"] = connection.addr
            out.append(data)
        return out

    def shutdown(self) -> list[tuple[str, str]]:
        return [(c.addr, message) for c, message in self._each(lambda c: c.shutdown())]
