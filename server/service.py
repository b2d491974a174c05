"""The `sspry.v1.Sspry` gRPC service over one writable Forest.

Searches run concurrently, each on the snapshot current when it starts, and never wait for writers.
Inserts are validated in full, then appended to the ingest log and fsynced before the call returns;
a malformed row fails the call with nothing written. A rule source arrives with its includes already
inlined by the client, and is compiled here with includes disabled, so the server never opens a path
a rule names.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import yara

from sspry.policy import PolicyError
from sspry.query.condition import iter_plans
from sspry.query.search import search_snapshot
from sspry.store.forest import PUBLISH_BYTES, Forest
from sspry.v1 import sspry_pb2, sspry_pb2_grpc
from sspry.wire import RowAssembler, WireError, file_record, policy_to_proto

CANDIDATES_PER_FRAME = 10_000
PATH_FRAME_BYTES = 1 << 20  # paths sent per frame, roughly
MAX_TARGETS = 100_000
PROGRESS_INTERVAL_S = 0.5  # while planning, a progress frame at least this often ...
PROGRESS_RULES = 256  # ... and after every this many rules


class SspryService(sspry_pb2_grpc.SspryServicer):
    def __init__(
        self,
        forest: Forest,
        *,
        token: str | None = None,
        max_insert_bytes: int = 1 << 30,
        search_workers: int = 0,
        on_shutdown: Callable[[], None] = lambda: None,
    ):
        self.forest = forest
        self.token = token
        self.max_insert_bytes = max_insert_bytes
        self.search_workers = search_workers
        self.on_shutdown = on_shutdown
        self.last_write = time.monotonic()
        self.active_searches = 0
        self._counter_lock = threading.Lock()

    # --- helpers -----------------------------------------------------------------------------------
    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        metadata = dict(context.invocation_metadata())
        given = metadata.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def _wrote(self) -> None:
        self.last_write = time.monotonic()

    # --- RPCs --------------------------------------------------------------------------------------
    def Info(self, request, context):
        self._authorize(context)
        info = self.forest.info()
        info["active_searches"] = self.active_searches
        return sspry_pb2.InfoResponse(
            policy=policy_to_proto(self.forest.policy), documents=info["documents"], json=json.dumps(info)
        )

    def Insert(self, request_iterator: Iterator[sspry_pb2.InsertFrame], context):
        self._authorize(context)
        assembler = RowAssembler(self.max_insert_bytes)
        try:
            for frame in request_iterator:
                assembler.add(frame)
            rows = assembler.finish()
            result = self.forest.ingest_rows(rows)
        except (WireError, PolicyError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nothing written: {exc}")
        self._wrote()
        return sspry_pb2.InsertSummary(
            rows=len(rows), bytes=assembler.bytes, inserted=result.inserted, duplicates=result.duplicates
        )

    def _source_ids(self, ids, context) -> list[bytes]:
        """The request's Source IDs, each checked against the policy's length."""
        policy = self.forest.policy
        for source_id in ids:
            if len(source_id) != policy.id_bytes:
                message = f"source id of {len(source_id)} bytes: this forest uses {policy.id_source}"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return list(ids)

    def Exists(self, request, context):
        self._authorize(context)
        ids = self._source_ids(request.source_ids, context)
        if not request.files:
            return sspry_pb2.ExistsResponse(present=self.forest.holds(ids).tolist())
        if len(request.files) != len(ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "files and source_ids differ in length")
        try:
            records = [file_record(f, i, self.forest.policy) for f, i in zip(request.files, ids, strict=True)]
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._wrote()
        return sspry_pb2.ExistsResponse(present=self.forest.record_files(ids, records).tolist())

    def KnownFiles(self, request, context):
        self._authorize(context)
        stamps = [(bytes(f.path_key), f.size, f.mtime_ns) for f in request.files]
        return sspry_pb2.KnownFilesResponse(known=self.forest.known_files(stamps))

    def Publish(self, request, context):
        self._authorize(context)
        result = self.forest.publish()
        self._wrote()
        return sspry_pb2.PublishResponse(
            inserted=result.inserted, duplicates=result.duplicates, documents=self.forest.snapshot().documents
        )

    def Delete(self, request, context):
        self._authorize(context)
        ids = self._source_ids(request.source_ids, context)
        deleted = self.forest.delete(ids) if ids else []
        by_path = [
            sspry_pb2.PathMatch(
                path=d.path,
                source_id=d.source_id or b"",
                document_deleted=d.document_deleted,
                remaining_paths=d.remaining_paths,
            )
            for d in (self.forest.delete_paths(list(request.paths)) if request.paths else [])
        ]
        self._wrote()
        return sspry_pb2.DeleteResponse(deleted=deleted, by_path=by_path)

    def Search(self, request: sspry_pb2.SearchRequest, context):
        self._authorize(context)
        targets = list(request.targets)
        if not targets or len(targets) > MAX_TARGETS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a search names 1 to {MAX_TARGETS} target rules")
        source = request.source or None
        if source is not None:
            try:
                compiled = yara.compile(source=source, includes=False)
            except yara.Error as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid YARA rule: {exc}")
            known = {r.identifier for r in compiled}
            missing = [t for t in targets if t not in known]
            if missing:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"target rules not in the source: {missing[:5]}"
                )
        with self._counter_lock:
            self.active_searches += 1
        try:
            started = time.perf_counter()
            plans = []
            reported = started
            for plan in iter_plans(source, targets, self.forest.policy, request.max_anchors or 16):
                plans.append(plan)
                if len(plans) % PROGRESS_RULES == 0 or time.perf_counter() - reported >= PROGRESS_INTERVAL_S:
                    reported = time.perf_counter()
                    progress = sspry_pb2.SearchProgress(stage="plan", done=len(plans), total=len(targets))
                    yield sspry_pb2.SearchFrame(progress=progress)
            planned = time.perf_counter()
            result = search_snapshot(
                self.forest.snapshot(), plans, self.forest.policy, 0.0, self.search_workers
            )
            paths = self.forest.paths_of(result.source_ids())
            searched = time.perf_counter()
        finally:
            with self._counter_lock:
                self.active_searches -= 1
        for index, rule in enumerate(result.rules):
            ids = [c.source_id for c in rule.candidates]
            for start in range(0, max(len(ids), 1), CANDIDATES_PER_FRAME):
                yield sspry_pb2.SearchFrame(
                    candidates=sspry_pb2.RuleCandidates(
                        rule=index,
                        source_ids=ids[start : start + CANDIDATES_PER_FRAME],
                        rule_end=start + CANDIDATES_PER_FRAME >= len(ids),
                    )
                )
        documents, size = [], 0
        for source_id, found in paths.items():
            documents.append(
                sspry_pb2.CandidatePaths(source_id=source_id, paths=found.paths, path_count=found.count)
            )
            size += len(source_id) + sum(len(p) + 8 for p in found.paths)
            if size >= PATH_FRAME_BYTES:
                yield sspry_pb2.SearchFrame(paths=sspry_pb2.PathsFrame(documents=documents))
                documents, size = [], 0
        if documents:
            yield sspry_pb2.SearchFrame(paths=sspry_pb2.PathsFrame(documents=documents))
        yield sspry_pb2.SearchFrame(
            summary=sspry_pb2.SearchSummary(
                documents=result.documents,
                elapsed_ms=(searched - started) * 1000,
                plan_ms=(planned - started) * 1000,
                search_ms=(searched - planned) * 1000,
            )
        )

    def Shutdown(self, request, context):
        self._authorize(context)
        threading.Thread(target=self.on_shutdown, daemon=True).start()
        return sspry_pb2.ShutdownResponse(message="shutdown requested")


class Backoff:
    """When a maintenance task may run again after failing: exponentially later (BASE_S, doubling up to
    CAP_S), reset by a success. A failure streak is logged once, when it starts, and its end once."""

    BASE_S = 0.5
    CAP_S = 30.0

    def __init__(self, task: str):
        self.task = task
        self.failures = 0
        self.next_at = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, exc: Exception, now: float) -> None:
        self.failures += 1
        self.next_at = now + min(self.CAP_S, self.BASE_S * 2 ** (self.failures - 1))
        if self.failures == 1:
            print(
                f"sspry maintenance: {self.task} failed: {type(exc).__name__}: {exc} "
                f"(retrying every {self.BASE_S:g}-{self.CAP_S:g} s until it works)",
                flush=True,
            )

    def succeeded(self) -> None:
        if self.failures:
            print(f"sspry maintenance: {self.task} works again after {self.failures} failures", flush=True)
        self.failures = 0
        self.next_at = 0.0


class Maintenance(threading.Thread):
    """Publishes what was inserted once inserts pause for a moment (or enough waits: inserted documents
    are held in memory until published), and merges small segments
    (size-tiered compaction) whenever the segment set changed, so neither waits for a client to ask
    and a server under continuous ingest does not pile up segments every search must visit.
    A failed publish or compaction (a full disk) changes nothing and is retried with backoff, each on
    its own schedule: acknowledged rows stay in the log, searches go on over the last manifest."""

    def __init__(self, service: SspryService, publish_idle_s: float = 1.0):
        super().__init__(name="sspry-maintenance", daemon=True)
        self.service = service
        self.publish_idle_s = publish_idle_s
        self.stopping = threading.Event()
        self._compacted_generation = -1
        self.publishing = Backoff("publish")
        self.compacting = Backoff("compaction")

    def run(self) -> None:
        forest = self.service.forest
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            idle = now - self.service.last_write
            if self.publishing.ready(now):
                try:
                    pending = forest.pending_bytes
                    if pending and (idle >= self.publish_idle_s or pending >= PUBLISH_BYTES):
                        forest.publish()
                    self.publishing.succeeded()
                except Exception as exc:  # keep serving; retried with backoff
                    self.publishing.failed(exc, now)
            if forest.manifest.generation != self._compacted_generation and self.compacting.ready(now):
                try:
                    forest.compact(full=False)
                    self._compacted_generation = forest.manifest.generation
                    self.compacting.succeeded()
                except Exception as exc:
                    self.compacting.failed(exc, now)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
