"""The `sspry.v1.Sspry` gRPC service over one writable Forest, on an asyncio server.

No call can stop the others: the event loop only moves messages, and the blocking work runs on separate
thread pools — searches on one, writes on another, `Info` on its own — so `Info` and the health check
answer while every search thread is busy and every insert is stalled. An insert stream that sends
nothing for `idle_timeout_s` is ended; the bytes of all inserts in flight share one budget (a call that
would exceed it is refused with RESOURCE_EXHAUSTED, before its bytes are held); a search stops when its
client leaves or its deadline passes.

Searches run concurrently, each on the snapshot current when it starts, and never wait for writers.
Inserts are validated in full, then appended to the ingest log and fsynced before the call returns;
a malformed row fails the call with nothing written. A rule source arrives with its includes already
inlined by the client, and is compiled here with includes disabled, so the server never opens a path
a rule names. Whatever a client sends that is not valid is INVALID_ARGUMENT with the reason — even
bytes that are not a message at all.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from sspry.policy import PolicyError
from sspry.store.errors import StorageFull
from sspry.store.forest import PUBLISH_BYTES, Forest
from sspry.v1 import sspry_pb2
from sspry.wire import (
    RowAssembler,
    WireError,
    externals_from_proto,
    file_record,
    namespaces_from_proto,
    policy_to_proto,
)

CANDIDATES_PER_FRAME = 10_000
PATH_FRAME_BYTES = 1 << 20  # paths sent per frame, roughly
MAX_TARGETS = 100_000
PROGRESS_INTERVAL_S = 0.5  # while planning, a progress frame at least this often ...
PROGRESS_RULES = 256  # ... and after every this many rules
FRAMES_AHEAD = 32  # frames a search may have produced that its client has not taken yet
HAND_OVER_S = 0.05  # a search's frames wait on its thread at most about this long (see _Emitter)
SETTLE_AFTER_S = 30.0  # seconds without inserts before shards are merged into one segment each
SERVICE = sspry_pb2.DESCRIPTOR.services_by_name["Sspry"]
log = logging.getLogger("sspry.server")


@dataclass(frozen=True)
class Limits:
    """What one client may take of the server."""

    max_call_bytes: int = 1 << 30  # one insert call
    insert_budget_bytes: int = 1 << 30  # all insert calls in flight together
    idle_timeout_s: float = 60.0  # an insert stream silent this long is ended
    searches: int = 4  # searches running at once (more wait for a turn)


DEFAULT_LIMITS = Limits()


class _Malformed:
    """What arrived where a message was expected but does not parse as one."""

    def __init__(self, kind: str, error: str):
        self.kind, self.error = kind, error


def _tolerant(message_class):
    """A deserializer that turns bytes that are not a `message_class` into `_Malformed`, so that the
    service answers INVALID_ARGUMENT (grpc itself would answer INTERNAL)."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return _Malformed(message_class.__name__, str(exc))

    return parse


class _Budget:
    """Bytes of insert calls in flight, server-wide (used from the event loop only)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, amount: int) -> bool:
        if self.used + amount > self.limit:
            return False
        self.used += amount
        return True

    def give(self, amount: int) -> None:
        self.used -= amount


class _Cancelled(Exception):
    """The client of a search left, or its deadline passed."""


class SspryService:
    def __init__(
        self,
        forest: Forest,
        *,
        token: str | None = None,
        search_workers: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        on_shutdown: Callable[[], None] = lambda: None,
    ):
        self.forest = forest
        self.token = token
        self.search_workers = search_workers
        self.limits = limits
        self.on_shutdown = on_shutdown
        self.last_write = time.monotonic()
        self.active_searches = 0
        self._budget = _Budget(limits.insert_budget_bytes)
        self._search_pool = ThreadPoolExecutor(limits.searches, thread_name_prefix="sspry-search-call")
        self._write_pool = ThreadPoolExecutor(4, thread_name_prefix="sspry-write")
        self._info_pool = ThreadPoolExecutor(2, thread_name_prefix="sspry-info")
        from sspry.query.plancache import PlanCache  # here: the planner loads yaramod

        self.plan_cache = PlanCache(forest.plan_cache_dir)  # plans of earlier searches, across restarts
        self._policy_proto = policy_to_proto(forest.policy)  # a forest's policy never changes

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, each checking for malformed requests first."""
        handlers = {}
        for method in SERVICE.methods:
            request = getattr(sspry_pb2, method.input_type.name)
            response = getattr(sspry_pb2, method.output_type.name)
            kind = (
                grpc.stream_unary_rpc_method_handler
                if method.client_streaming
                else grpc.unary_stream_rpc_method_handler
                if method.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[method.name] = kind(
                getattr(self, method.name),
                request_deserializer=_tolerant(request),
                response_serializer=response.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def close(self) -> None:
        for pool in (self._search_pool, self._write_pool, self._info_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    # --- helpers -----------------------------------------------------------------------------------
    async def _check(self, request, context: grpc.aio.ServicerContext) -> None:
        """Authorize the call and refuse a request that is not a message."""
        if self.token is not None:
            given = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {request.kind} message: {request.error}"
            )

    async def _run(self, pool: ThreadPoolExecutor, context, call, *args):
        """`call(*args)` on `pool`; storage and input faults become status codes with one line."""
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call, *args))
        except (WireError, PolicyError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StorageFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server storage is full: {exc}")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server storage is full: {exc}")
            raise

    def _wrote(self) -> None:
        self.last_write = time.monotonic()

    def _source_ids(self, ids) -> list[bytes]:
        """The request's Source IDs, each checked against the policy's length (PolicyError if not)."""
        policy = self.forest.policy
        for source_id in ids:
            if len(source_id) != policy.id_bytes:
                raise PolicyError(f"source id of {len(source_id)} bytes: this forest uses {policy.id_source}")
        return list(ids)

    # --- RPCs --------------------------------------------------------------------------------------
    async def Info(self, request, context):
        await self._check(request, context)
        info = await self._run(self._info_pool, context, self.forest.info)
        info["active_searches"] = self.active_searches
        info["insert_bytes_in_flight"] = self._budget.used
        return sspry_pb2.InfoResponse(
            policy=self._policy_proto, documents=info["documents"], json=json.dumps(info)
        )

    async def Insert(self, request_iterator: AsyncIterator, context):
        await self._check(None, context)
        assembler = RowAssembler(self.limits.max_call_bytes)
        held = 0
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(anext(request_iterator), self.limits.idle_timeout_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"insert stream idle for {self.limits.idle_timeout_s:g} s: nothing written",
                    )
                await self._check(frame, context)
                if not self._budget.take(len(frame.chunk)):
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server busy: {self._budget.used} bytes of inserts in flight (budget "
                        f"{self._budget.limit}); nothing written, retry later",
                    )
                held += len(frame.chunk)
                try:
                    assembler.add(frame)
                except WireError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nothing written: {exc}")
            try:
                rows = assembler.finish()
            except WireError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nothing written: {exc}")
            result = await self._run(self._write_pool, context, self.forest.ingest_rows, rows)
        finally:
            self._budget.give(held)
        self._wrote()
        return sspry_pb2.InsertSummary(
            rows=len(rows), bytes=assembler.bytes, inserted=result.inserted, duplicates=result.duplicates
        )

    async def Exists(self, request, context):
        await self._check(request, context)

        def exists():
            ids = self._source_ids(request.source_ids)
            if not request.files:
                return self.forest.holds(ids)
            if len(request.files) != len(ids):
                raise WireError("files and source_ids differ in length")
            records = [file_record(f, i, self.forest.policy) for f, i in zip(request.files, ids, strict=True)]
            return self.forest.record_files(ids, records)

        present = await self._run(self._write_pool, context, exists)
        return sspry_pb2.ExistsResponse(present=present.tolist())

    async def KnownFiles(self, request, context):
        await self._check(request, context)
        stamps = [(bytes(f.path_key), f.size, f.mtime_ns) for f in request.files]
        known = await self._run(self._write_pool, context, self.forest.known_files, stamps)
        return sspry_pb2.KnownFilesResponse(known=known)

    async def Publish(self, request, context):
        await self._check(request, context)
        result = await self._run(self._write_pool, context, self.forest.publish)
        log.info("publish: %d inserted, %d duplicates", result.inserted, result.duplicates)
        self._wrote()
        return sspry_pb2.PublishResponse(
            inserted=result.inserted, duplicates=result.duplicates, documents=self.forest.snapshot().documents
        )

    async def Delete(self, request, context):
        await self._check(request, context)

        def delete():
            ids = self._source_ids(request.source_ids)
            deleted = self.forest.delete(ids) if ids else []
            by_path = self.forest.delete_paths(list(request.paths)) if request.paths else []
            return deleted, by_path

        deleted, by_path = await self._run(self._write_pool, context, delete)
        self._wrote()
        return sspry_pb2.DeleteResponse(
            deleted=deleted,
            by_path=[
                sspry_pb2.PathMatch(
                    path=d.path,
                    source_id=d.source_id or b"",
                    document_deleted=d.document_deleted,
                    remaining_paths=d.remaining_paths,
                )
                for d in by_path
            ],
        )

    async def Search(self, request: sspry_pb2.SearchRequest, context):
        await self._check(request, context)
        try:
            namespaces = namespaces_from_proto(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not 0 < sum(len(targets) for _, _, targets in namespaces) <= MAX_TARGETS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a search names 1 to {MAX_TARGETS} target rules"
            )
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        context.add_done_callback(lambda _: cancelled.set())  # the client left, or the deadline passed
        emit = _Emitter(loop, frames, cancelled)

        def work() -> None:
            from sspry.query.ruleset import gc_relaxed

            received = time.perf_counter()
            try:
                with gc_relaxed():  # as searches in process do (query/search.py)
                    self._search(request, _rule_source(namespaces, request), emit, cancelled, received)
            except _Cancelled:
                pass
            except BaseException as exc:
                emit.hand_over()
                loop.call_soon_threadsafe(frames.put_nowait, exc)
            finally:
                emit.hand_over()
                loop.call_soon_threadsafe(frames.put_nowait, None)

        self.active_searches += 1
        running = loop.run_in_executor(self._search_pool, work)
        try:
            while (frame := await frames.get()) is not None:
                emit.room.release()
                if isinstance(frame, WireError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(frame))
                if isinstance(frame, BaseException):
                    raise frame
                yield frame
        finally:
            cancelled.set()
            try:
                await asyncio.shield(running)  # the worker notices within a segment's evaluation
            finally:
                self.active_searches -= 1

    def _search(self, request, source, emit, cancelled: threading.Event, started: float) -> None:
        """Plan and search `source` (a RuleSource) on a worker thread, emitting frames (see SearchFrame in
        the proto); stops early once `cancelled` is set. The plan time counts from `started` (the
        request's arrival, before YARA checked the source)."""
        from sspry.query.evaluate import evaluate_snapshot
        from sspry.query.literals import DEFAULT_MAX_ANCHORS
        from sspry.query.ruleset import iter_source_plans
        from sspry.query.search import hits_result, note_codes

        snapshot = self.forest.snapshot()
        opening = sspry_pb2.SearchStart(documents=snapshot.documents, policy=self._policy_proto)
        emit(sspry_pb2.SearchFrame(start=opening))
        plans = []
        reported = started
        anchors = request.max_anchors or DEFAULT_MAX_ANCHORS
        targets = source.targets
        plans_of = iter_source_plans(source, self.forest.policy, anchors, cache=self.plan_cache)
        for plan in plans_of:
            if cancelled.is_set():
                raise _Cancelled
            plans.append(plan)
            if len(plans) % PROGRESS_RULES == 0 or time.perf_counter() - reported >= PROGRESS_INTERVAL_S:
                reported = time.perf_counter()
                emit(_planned(len(plans), len(targets)))
        emit(_planned(len(plans), len(targets)))
        emit.hand_over(HAND_OVER_S)  # the client sees planning end before a long evaluation
        planned = time.perf_counter()
        hits = evaluate_snapshot(
            snapshot, [p.upper for p in plans], self.forest.policy, self.search_workers, cancelled=cancelled
        )
        if cancelled.is_set():
            raise _Cancelled
        limit = None if request.limit == 0 else request.limit
        sent: set[bytes] = set()  # documents whose paths this search has sent
        candidates = 0
        for index, (plan, found) in enumerate(zip(plans, hits, strict=True)):
            if cancelled.is_set():
                raise _Cancelled
            rule = hits_result(plan.name, snapshot, found, limit, request.count_only)
            ids = [c.source_id for c in rule.candidates]
            fresh = [i for i in ids if i not in sent]
            sent.update(fresh)
            self._emit_paths(fresh, emit)
            for start in range(0, max(len(ids), 1), CANDIDATES_PER_FRAME):
                end = start + CANDIDATES_PER_FRAME >= len(ids)
                emit(
                    sspry_pb2.SearchFrame(
                        candidates=sspry_pb2.RuleCandidates(
                            rule=index,
                            source_ids=ids[start : start + CANDIDATES_PER_FRAME],
                            rule_end=end,
                            count=rule.candidate_count if end else 0,
                            notes=note_codes(plan) if end else [],
                        )
                    )
                )
            candidates += rule.candidate_count
        searched = time.perf_counter()
        log.info(
            "search: %d rules, %d candidates, plan %.1f ms, search %.1f ms",
            len(targets),
            candidates,
            (planned - started) * 1000,
            (searched - planned) * 1000,
        )
        emit(
            sspry_pb2.SearchFrame(
                summary=sspry_pb2.SearchSummary(
                    documents=snapshot.documents,
                    elapsed_ms=(searched - started) * 1000,
                    plan_ms=(planned - started) * 1000,
                    search_ms=(searched - planned) * 1000,
                )
            )
        )

    def _emit_paths(self, source_ids: list[bytes], emit) -> None:
        """The recorded paths of these documents, in frames of about PATH_FRAME_BYTES."""
        documents, size = [], 0
        for source_id, found in self.forest.paths_of(source_ids).items():
            documents.append(
                sspry_pb2.CandidatePaths(
                    source_id=source_id,
                    paths=found.paths,
                    path_count=found.count,
                    sizes=[size for size, _ in found.stamps],
                    mtimes_ns=[mtime for _, mtime in found.stamps],
                )
            )
            size += len(source_id) + sum(len(p) + 8 for p in found.paths)
            if size >= PATH_FRAME_BYTES:
                emit(sspry_pb2.SearchFrame(paths=sspry_pb2.PathsFrame(documents=documents)))
                documents, size = [], 0
        if documents:
            emit(sspry_pb2.SearchFrame(paths=sspry_pb2.PathsFrame(documents=documents)))

    async def Shutdown(self, request, context):
        await self._check(request, context)
        asyncio.get_running_loop().call_soon(self.on_shutdown)
        return sspry_pb2.ShutdownResponse(message="shutdown requested")


class _Emitter:
    """A search's frames, from its worker thread to the event loop, handed over in bursts.

    Handing a frame to the loop wakes it, and the woken loop takes the GIL from the worker mid-search:
    a repeated single rule at 3,000 documents took 1.33 ms on the server with a hand-over per frame
    (start, progress, candidates, paths, summary), 0.69 ms with one at the end. So frames wait on the
    worker's side until the oldest is HAND_OVER_S old (checked as frames come), the client's room runs
    out, or the search ends; `room` bounds the frames not yet taken (held ones too), so memory stays
    flat and a slow client slows the worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, frames: asyncio.Queue, cancelled: threading.Event):
        self.loop, self.frames, self.cancelled = loop, frames, cancelled
        self.room = threading.Semaphore(FRAMES_AHEAD)  # released as the client takes frames
        self.held: list = []
        self.oldest = 0.0

    def __call__(self, frame) -> None:
        if not self.room.acquire(blocking=False):
            self.hand_over()  # what is held must reach the client before room frees
            while not self.room.acquire(timeout=0.5):
                if self.cancelled.is_set():
                    raise _Cancelled
        now = time.perf_counter()
        if not self.held:
            self.oldest = now
        self.held.append(frame)
        self.hand_over(HAND_OVER_S, now)

    def hand_over(self, older_than: float = 0.0, now: float | None = None) -> None:
        """Give the loop the held frames if the oldest is at least `older_than` seconds old."""
        if self.held and (now or time.perf_counter()) - self.oldest >= older_than:
            batch, self.held = self.held, []
            self.loop.call_soon_threadsafe(self._put, batch)

    def _put(self, batch: list) -> None:
        for frame in batch:
            self.frames.put_nowait(frame)


def _planned(done: int, total: int) -> sspry_pb2.SearchFrame:
    return sspry_pb2.SearchFrame(progress=sspry_pb2.SearchProgress(stage="plan", done=done, total=total))


_compiled_lock = threading.Lock()
_compiled: OrderedDict[bytes, frozenset[str]] = OrderedDict()  # sha256 of a valid source -> its rules
COMPILED_SOURCES = 4096  # sources (a namespace each) whose rule names are kept: a rule directory has hundreds


def _rule_source(namespaces: list, request: sspry_pb2.SearchRequest):
    """The RuleSource of a request's namespaces, each checked by YARA (`_compile_problem`); WireError
    naming what YARA refuses."""
    from sspry.query.rules import Namespace, RuleSource

    externals = externals_from_proto(request.externals)
    for name, source, targets in namespaces:
        problem = _compile_problem(source, targets, externals) if source is not None else None
        if problem:
            raise WireError(f"namespace {name}: {problem}" if len(namespaces) > 1 else problem)
    found = tuple(Namespace(name, f"namespace {name}", text, tuple(t)) for name, text, t in namespaces)
    return RuleSource(found, externals)


def _compile_problem(source: str, targets: list[str], externals: dict) -> str | None:
    """Why YARA refuses `source` (includes disabled) with `externals`, or names a target it does not
    hold; None if fine. The rules of sources that compiled are remembered: a bundle searched again is
    not compiled again."""
    from sspry.query.externals import digest_part
    from sspry.query.rules import DEFAULT_NAMESPACE, RuleError, Spec, judged, rule_names

    key = digest_part(externals) + "\0" + source
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    with _compiled_lock:
        known = _compiled.get(digest)
    if known is None:
        try:
            engine, compiled = judged(Spec(DEFAULT_NAMESPACE, text=source), externals, includes=False)
        except RuleError as exc:
            return str(exc)
        known = frozenset(name for name, _ in rule_names(engine, compiled, set))
        with _compiled_lock:
            _compiled[digest] = known
            while len(_compiled) > COMPILED_SOURCES:
                _compiled.popitem(last=False)
    missing = [t for t in targets if t not in known]
    return f"target rules not in the source: {missing[:5]}" if missing else None


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
            log.warning(
                "maintenance: %s failed: %s: %s (retrying every %g-%g s until it works)",
                self.task,
                type(exc).__name__,
                exc,
                self.BASE_S,
                self.CAP_S,
            )

    def succeeded(self) -> None:
        if self.failures:
            log.warning("maintenance: %s works again after %d failures", self.task, self.failures)
        self.failures = 0
        self.next_at = 0.0


class Maintenance(threading.Thread):
    """Publishes what was inserted once inserts pause for a moment (or enough waits: inserted documents
    are held in memory until published), and merges small segments
    (size-tiered compaction) whenever the segment set changed, so neither waits for a client to ask
    and a server under continuous ingest does not pile up segments every search must visit.
    Once no insert came for `settle_after_s` (0: never), it also merges each shard's segments into one,
    a shard per turn (publishing waits for one shard's merge at most): a search pays per segment and
    size class (100,000 documents: 40 segments took 2.8 ms a rule to evaluate, 8 took 1.0 ms), and
    a shard is bounded by its tree (policy.tree_docs / shards documents), so is its rewrite.
    A failed publish or compaction (a full disk) changes nothing and is retried with backoff, each on
    its own schedule: acknowledged rows stay in the log, searches go on over the last manifest."""

    def __init__(
        self, service: SspryService, publish_idle_s: float = 1.0, settle_after_s: float = SETTLE_AFTER_S
    ):
        super().__init__(name="sspry-maintenance", daemon=True)
        self.service = service
        self.publish_idle_s = publish_idle_s
        self.settle_after_s = settle_after_s
        self.stopping = threading.Event()
        self._compacted_generation = -1
        self._settled_generation = -1
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
            settled = forest.manifest.generation == self._settled_generation
            if (
                self.settle_after_s
                and idle >= self.settle_after_s
                and not settled
                and self.compacting.ready(now)
            ):
                try:
                    generation = forest.manifest.generation
                    merged = forest.compact(full=True, shard_limit=1).rewritten
                    if not merged and forest.manifest.generation == generation:
                        self._settled_generation = generation
                    self.compacting.succeeded()
                except Exception as exc:
                    self.compacting.failed(exc, now)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
