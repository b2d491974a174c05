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
from sspry.query.condition import plan_rules
from sspry.query.search import search_snapshot
from sspry.store.forest import PUBLISH_BYTES, Forest
from sspry.v1 import sspry_pb2, sspry_pb2_grpc
from sspry.wire import RowAssembler, WireError, policy_to_proto

CANDIDATES_PER_FRAME = 10_000
MAX_TARGETS = 100_000


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
            self.forest.ingest_rows(rows)
        except (WireError, PolicyError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nothing written: {exc}")
        self._wrote()
        return sspry_pb2.InsertSummary(rows=len(rows), bytes=assembler.bytes)

    def Exists(self, request, context):
        self._authorize(context)
        return sspry_pb2.ExistsResponse(present=self.forest.contains(list(request.source_ids)).tolist())

    def Publish(self, request, context):
        self._authorize(context)
        result = self.forest.publish()
        self._wrote()
        return sspry_pb2.PublishResponse(
            inserted=result.inserted, duplicates=result.duplicates, documents=self.forest.snapshot().documents
        )

    def Delete(self, request, context):
        self._authorize(context)
        policy = self.forest.policy
        for source_id in request.source_ids:
            if len(source_id) != policy.id_bytes:
                message = f"source id of {len(source_id)} bytes: this forest uses {policy.id_source}"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        by_path = [sspry_pb2.PathMatch(path=p, source_ids=self.forest.find_paths([p])) for p in request.paths]
        ids = list(request.source_ids) + [i for match in by_path for i in match.source_ids]
        deleted = self.forest.delete(ids) if ids else []
        self._wrote()
        return sspry_pb2.DeleteResponse(deleted=deleted[: len(request.source_ids)], by_path=by_path)

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
            plans = plan_rules(source, targets, self.forest.policy, request.max_anchors or 16)
            result = search_snapshot(
                self.forest.snapshot(), plans, self.forest.policy, 0.0, self.search_workers
            )
        finally:
            with self._counter_lock:
                self.active_searches -= 1
        for index, rule in enumerate(result.rules):
            candidates = rule.candidates
            for start in range(0, max(len(candidates), 1), CANDIDATES_PER_FRAME):
                part = candidates[start : start + CANDIDATES_PER_FRAME]
                yield sspry_pb2.SearchFrame(
                    candidates=sspry_pb2.RuleCandidates(
                        rule=index,
                        source_ids=[c.source_id for c in part],
                        paths=[c.path or "" for c in part],
                        rule_end=start + CANDIDATES_PER_FRAME >= len(candidates),
                    )
                )
        yield sspry_pb2.SearchFrame(
            summary=sspry_pb2.SearchSummary(documents=result.documents, elapsed_ms=result.elapsed_ms)
        )

    def Shutdown(self, request, context):
        self._authorize(context)
        threading.Thread(target=self.on_shutdown, daemon=True).start()
        return sspry_pb2.ShutdownResponse(message="shutdown requested")


class Maintenance(threading.Thread):
    """Publishes what was inserted once inserts pause for a moment (or enough waits: inserted documents
    are held in memory until published), and merges small segments
    (size-tiered compaction) whenever the segment set changed, so neither waits for a client to ask
    and a server under continuous ingest does not pile up segments every search must visit."""

    def __init__(self, service: SspryService, publish_idle_s: float = 1.0):
        super().__init__(name="sspry-maintenance", daemon=True)
        self.service = service
        self.publish_idle_s = publish_idle_s
        self.stopping = threading.Event()
        self._compacted_generation = -1

    def run(self) -> None:
        forest = self.service.forest
        while not self.stopping.wait(0.5):
            idle = time.monotonic() - self.service.last_write
            try:
                pending = forest.pending_bytes
                if pending and (idle >= self.publish_idle_s or pending >= PUBLISH_BYTES):
                    forest.publish()
                if forest.manifest.generation != self._compacted_generation:
                    forest.compact(full=False)
                    self._compacted_generation = forest.manifest.generation
            except Exception as exc:  # keep serving; the next round retries
                print(f"sspry maintenance: {type(exc).__name__}: {exc}", flush=True)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
