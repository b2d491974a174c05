"""File -> Document: every feature of a file, reading it once.

Per file: the Source ID, a byte histogram (entropy), the longest runs of hex digits (runs.py),
HyperLogLog estimates of distinct Tier 1 and Tier 2 grams, the two blooms sized from those estimates,
and YARA's module fields (metadata.py). Files up to IN_MEMORY_BYTES are read into memory once and
scanned twice (count, then insert); larger files are streamed twice and the second read must hash to
the same Source ID, so a file that changes underneath us is reported instead of indexed wrong. A
3-gram tier of a file of 1 MiB or more is counted exactly and built from its distinct grams in the
first scan (see kernels.py).
The compiled kernels release the GIL, so a thread pool gives real parallelism.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np

from sspry.document import Document, path_key, settled_mtime
from sspry.features import kernels
from sspry.features.metadata import module_fields
from sspry.features.runs import RunCounter
from sspry.features.sizing import HLL_PRECISION, bloom_blocks
from sspry.features.walk import SkippedFile
from sspry.policy import BLOCK_BITS, Policy, PolicyError

IN_MEMORY_BYTES = 256 << 20
STREAM_CHUNK = 16 << 20
EXACT_MIN_BYTES = 1 << 20  # below this, scanning the 2 MiB 3-gram bitmap costs more than hashing windows
KEEP_HASHES_MAX_BYTES = 1 << 20  # up to this size a file's bloom hashes are kept between the two scans
PENDING_FILES = 512  # files submitted ahead per extraction thread, at most (see extract_many)
PENDING_BYTES = 256 << 20  # ... and input bytes between them, unless only 2 per thread are pending
PENDING_FILE_BYTES = 32 << 20  # what one file counts against PENDING_BYTES at most (see extract_many)
BIG_FILE_BYTES = 16 << 20  # files this big take their bytes from HELD_BYTES while they are in memory
HELD_BYTES = 160 << 20  # ... which the workers' big files share (see _Held)
HLL_THRESHOLD = 15500  # datasketch's linear-counting threshold for precision 14


def shannon_entropy(hist: np.ndarray) -> float:
    """Entropy in bits per byte, computed as YARA's math.entropy does (double precision)."""
    return float(kernels.entropy(hist))


def hll_estimate(reg: np.ndarray) -> int:
    """datasketch's HyperLogLog++ estimate; small cardinalities (most files) take its linear-counting
    branch, computed here without building the object (tests hold the two equal)."""
    zeros = int(reg.size - np.count_nonzero(reg))
    if zeros:
        counted = reg.size * math.log(reg.size / zeros)
        if counted <= HLL_THRESHOLD:
            return round(counted)
    from datasketch.hyperloglog import HyperLogLogPlusPlus  # imports scipy: 0.8 s, paid only here

    return round(HyperLogLogPlusPlus(p=HLL_PRECISION, reg=reg).count())


class _Reader:
    """A file's bytes as (chunk, carried) pairs: the whole file from memory, or streamed again on each
    call in chunks that repeat the previous chunk's last `kernels.CARRY` bytes (`carried` of them)."""

    def __init__(self, path: str, handle, size: int):
        self.path = path
        self.handle = handle
        self.size = size
        self.whole: np.ndarray | None = None
        if size <= IN_MEMORY_BYTES:
            buffer = bytearray(size)
            got = handle.readinto(buffer)
            if got != size or handle.read(1):
                raise SkippedFile(path, "file changed size while being read")
            self.whole = np.frombuffer(buffer, dtype=np.uint8)

    def chunks(self) -> Iterator[tuple[np.ndarray, int]]:
        if self.whole is not None:
            yield self.whole, 0
            return
        self.handle.seek(0)
        total = 0
        tail = b""
        while True:
            block = self.handle.read(STREAM_CHUNK)
            if not block:
                break
            total += len(block)
            yield np.frombuffer(tail + block, dtype=np.uint8), len(tail)
            tail = (tail + block)[-kernels.CARRY :]
        if total != self.size:
            raise SkippedFile(self.path, "file changed size while being read")


class _Tier:
    """Counting and bloom building for one tier, in one of three modes:
    exact   3-gram presence bitmap, exact count, bloom from the distinct grams (big files);
    kept    HyperLogLog while keeping each window's bloom hash, bloom from those (files in memory);
    rescan  HyperLogLog, then every window hashed again into the bloom (files too big to keep 8 bytes
            per window for)."""

    def __init__(self, policy: Policy, tier: int, filesize: int, in_memory: bool):
        self.n = policy.tier_gram(tier)
        self.k = policy.tier_k(tier)
        self.policy = policy
        self.tier = tier
        self.fold = policy.fold_case and tier == 1  # folding is a Tier 1 affair: see policy.fold_case
        if self.n == 3 and filesize >= EXACT_MIN_BYTES:
            self.mode = "exact"
            self.counter = np.zeros(kernels.PRESENCE_BYTES, np.uint8)
        else:
            self.mode = "kept" if in_memory and filesize <= KEEP_HASHES_MAX_BYTES else "rescan"
            self.counter = np.zeros(1 << HLL_PRECISION, np.int8)
        windows = filesize * (2 if self.fold else 1) + 1
        self.hashes = np.empty(windows, np.uint64) if self.mode == "kept" else None
        self.kept = 0
        self.estimate = 0
        self.bloom = np.zeros(0, np.uint8)
        self._parts: list[Future] = []
        self._other: np.ndarray | None = None

    def count(self, chunk: np.ndarray, carried: int) -> None:
        first = kernels.first_window(carried, self.n)
        if self.mode == "exact":
            kernels.gram3_presence(chunk, first, self.counter)
        elif self.mode == "kept":
            self.kept = kernels.hll_collect(chunk, first, self.n, self.fold, self.counter, self.hashes)
        else:
            kernels.hll_update(chunk, first, self.n, self.fold, self.counter)

    def size_bloom(self) -> None:
        if self.mode == "exact":
            if self.fold:
                kernels.presence_lower(self.counter)
            self.estimate = int(np.bitwise_count(self.counter).sum())
        else:
            self.estimate = hll_estimate(self.counter)
        blocks = bloom_blocks(self.estimate, self.policy, self.tier)
        self.bloom = np.zeros(blocks * BLOCK_BITS // 8, dtype=np.uint8)
        if self.mode == "exact":
            kernels.presence_bloom(self.counter, self.k, blocks, self.bloom)
        elif self.mode == "kept":
            kernels.bloom_apply(self.hashes, self.kept, self.k, blocks, self.bloom)
            self.hashes = None

    def insert(self, chunk: np.ndarray, carried: int) -> None:
        first = kernels.first_window(carried, self.n)
        blocks = len(self.bloom) * 8 // BLOCK_BITS
        kernels.bloom_insert(chunk, first, self.n, self.k, self.fold, blocks, self.bloom)

    # A rescan tier can be counted and inserted in parts on helper threads: HyperLogLog registers merge
    # by maximum and blooms by OR, so the result is the same bits. A file in memory is cut in two halves
    # once; a streamed file's chunks are counted on a helper one after the other while this thread
    # does the rest of the chunk, and inserted half on a helper, half here.
    def _halves(self, chunk: np.ndarray, carried: int = 0) -> list[tuple[np.ndarray, int]]:
        """Two (chunk, carried) parts of `chunk` holding each of its windows from
        first_window(carried) on once."""
        first = kernels.first_window(carried, self.n)
        middle = first + max(0, len(chunk) - self.n + 1 - first) // 2
        return [(chunk[: middle + self.n - 1], carried), (chunk[middle:], self.n - 1)]

    def count_halves(self, whole: np.ndarray, helpers: Executor) -> None:
        self._other = np.zeros_like(self.counter)
        self._parts = [
            helpers.submit(
                kernels.hll_update, chunk, kernels.first_window(carried, self.n), self.n, self.fold, reg
            )
            for (chunk, carried), reg in zip(self._halves(whole), (self.counter, self._other), strict=True)
        ]

    def insert_halves(self, whole: np.ndarray, helpers: Executor) -> None:
        blocks = len(self.bloom) * 8 // BLOCK_BITS
        self._other = np.zeros_like(self.bloom)
        self._parts = [
            helpers.submit(
                kernels.bloom_insert,
                chunk,
                kernels.first_window(carried, self.n),
                self.n,
                self.k,
                self.fold,
                blocks,
                bloom,
            )
            for (chunk, carried), bloom in zip(self._halves(whole), (self.bloom, self._other), strict=True)
        ]

    def count_behind(self, chunk: np.ndarray, carried: int, helpers: Executor) -> None:
        """Count a streamed chunk on a helper, once the previous chunk is counted (see join)."""
        for part in self._parts:
            part.result()
        self._parts = [helpers.submit(self.count, chunk, carried)]

    def insert_split(self, chunk: np.ndarray, carried: int, helpers: Executor) -> None:
        """Insert a streamed chunk's first half on a helper (into a second bloom, ORed in by join) and
        its second half here."""
        for part in self._parts:
            part.result()
        if self._other is None:
            self._other = np.zeros_like(self.bloom)
        (head, head_carried), (rest, rest_carried) = self._halves(chunk, carried)
        blocks = len(self.bloom) * 8 // BLOCK_BITS
        first = kernels.first_window(head_carried, self.n)
        self._parts = [
            helpers.submit(kernels.bloom_insert, head, first, self.n, self.k, self.fold, blocks, self._other)
        ]
        self.insert(rest, rest_carried)

    def join(self) -> None:
        """Wait for the parts and merge them (registers by maximum, blooms by OR)."""
        for part in self._parts:
            part.result()
        if self._other is not None:
            if len(self.bloom):  # inserted
                np.bitwise_or(self.bloom, self._other, out=self.bloom)
            else:  # counted
                np.maximum(self.counter, self._other, out=self.counter)
        self._parts, self._other = [], None


def extract_file(path: str, policy: Policy, helpers: Executor | None = None) -> Document:
    """Compute the Document of one file. Raises SkippedFile for anything that prevents it. With
    `helpers` (a thread pool), a tier that is hashed twice (a file in memory over KEEP_HASHES_MAX_BYTES,
    or streamed) is counted and inserted in parts on it, while this thread does the rest: a big file
    then uses two cores when they are free (the same document either way)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, with the reader's lifetime
    except OSError as exc:
        raise SkippedFile(path, exc.strerror or str(exc)) from exc
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SkippedFile(path, "not a regular file")
        reader = _Reader(path, handle, info.st_size)
        hasher = policy.new_id_hasher()
        hist = np.zeros(256, dtype=np.int64)
        runs = RunCounter()
        in_memory = reader.whole is not None
        tiers = (_Tier(policy, 1, info.st_size, in_memory), _Tier(policy, 2, info.st_size, in_memory))
        halved = [t for t in tiers if helpers is not None and in_memory and t.mode == "rescan"]
        behind = [t for t in tiers if helpers is not None and not in_memory and t.mode == "rescan"]
        for tier in halved:
            tier.count_halves(reader.whole, helpers)
        prefix = b""
        for chunk, carried in reader.chunks():
            fresh = chunk[carried:]
            if len(prefix) < policy.prefix_bytes:
                prefix += fresh[: policy.prefix_bytes - len(prefix)].tobytes()
            for tier in behind:
                tier.count_behind(chunk, carried, helpers)
            hasher.update(fresh)
            kernels.byte_histogram(chunk, carried, hist)
            runs.update(chunk, carried)
            for tier in tiers:
                if tier not in halved and tier not in behind:
                    tier.count(chunk, carried)
        for tier in behind:
            tier.join()
        source_id = hasher.digest()
        if reader.whole is not None:
            fields, entry_bytes, scanned = module_fields(data=reader.whole)
        else:
            fields, entry_bytes, scanned = module_fields(path=path, head=prefix)
        fields.update(runs.fields())
        for tier in halved:
            tier.join()
            tier.size_bloom()
            tier.insert_halves(reader.whole, helpers)
        for tier in tiers:
            if tier not in halved:
                tier.size_bloom()
        for tier in halved:
            tier.join()
        second = [tier for tier in tiers if tier.mode == "rescan" and tier not in halved]
        if second:
            rehash = policy.new_id_hasher() if reader.whole is None else None
            for chunk, carried in reader.chunks():
                if rehash is not None:
                    rehash.update(chunk[carried:])
                for tier in second:
                    if tier in behind:
                        tier.insert_split(chunk, carried, helpers)
                    else:
                        tier.insert(chunk, carried)
            for tier in behind:
                tier.join()
            if rehash is not None and rehash.digest() != source_id:
                raise SkippedFile(path, "file changed while being read")
    except OSError as exc:
        raise SkippedFile(path, exc.strerror or str(exc)) from exc
    finally:
        handle.close()
    canonical = os.path.realpath(path)
    doc = Document(
        source_id=source_id,
        filesize=info.st_size,
        tier1=tiers[0].bloom,
        tier2=tiers[1].bloom,
        tier1_estimate=tiers[0].estimate,
        tier2_estimate=tiers[1].estimate,
        entropy=shannon_entropy(hist),
        prefix=prefix,
        path=canonical if policy.store_path else None,
        fields=fields,
        entry_bytes=entry_bytes,
        modules_scanned=scanned,
        path_key=path_key(canonical),
        mtime_ns=settled_mtime(info.st_mtime_ns, time.time_ns()),
    )
    try:
        doc.check(policy)  # a file over a limit of sspry.limits is a problem reported, not a failed run
    except PolicyError as exc:
        raise SkippedFile(path, f"cannot be indexed: {exc}") from None
    return doc


def warm_kernels(policy: Policy) -> None:
    """Run the kernels every file needs (those of a small file in memory) on a few bytes, through the
    same calls as extract_file. On a machine's first run numba compiles them here, after kernels.py's
    notice and before any progress is shown, instead of silently inside the first file; the kernels of
    big or streamed files still compile when such a file first comes (with the notice if none was shown)."""
    sample = np.frombuffer(bytearray(b"sspry warm-up"), dtype=np.uint8)
    hist = np.zeros(256, dtype=np.int64)
    kernels.byte_histogram(sample, 0, hist)
    shannon_entropy(hist)
    RunCounter().update(sample, 0)
    for tier in (1, 2):
        counter = _Tier(policy, tier, len(sample), in_memory=True)
        counter.count(sample, 0)
        counter.size_bloom()


class _Held:
    """The bytes of big files the workers hold in memory: a big file waits for others to finish while
    taking its bytes would pass HELD_BYTES (a file alone always goes). Two ~100 MB files extracted at
    once made the peak of a 2-worker run over /usr/bin (node and nodejs); one at a time, each still has
    two cores (its rescanned tier in halves on the helper threads)."""

    def __init__(self) -> None:
        self.held = 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[None]:
        if size < BIG_FILE_BYTES:
            yield
            return
        size = size if size <= IN_MEMORY_BYTES else 2 * STREAM_CHUNK  # streamed: a chunk or two at a time
        with self.changed:
            self.changed.wait_for(lambda: self.held == 0 or self.held + size <= HELD_BYTES)
            self.held += size
        try:
            yield
        finally:
            with self.changed:
                self.held -= size
                self.changed.notify_all()


def _extract_held(held: _Held, size: int, path: str, policy: Policy, helpers: Executor | None) -> Document:
    try:
        with held.holding(size):
            return extract_file(path, policy, helpers)
    finally:
        if size >= BIG_FILE_BYTES:
            _trim()


@functools.cache
def _libc():
    """The C library when it is glibc (it has malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc's, or AttributeError
    except (OSError, AttributeError):
        return None
    return libc


_M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _one_arena() -> None:
    """Have threads started from now on share malloc arenas instead of one each (glibc: up to 8 per
    core), once per process: each arena keeps the freed buffers of the big files its thread saw. Over a
    2-worker extraction of /usr/bin the peak was 810 MB with the default, 727 with _trim alone and
    630-710 with both (the same CPU time: the kernels allocate a few buffers per file, under no
    contention worth measuring). Process-wide: the index pipeline sets it when it starts extracting."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


def _trim() -> None:
    """Give the memory freed in every malloc arena back to the system. glibc keeps the freed buffers of
    a big file (its bytes, the bloom batches: tens of MB in each thread's arena, below its dynamic mmap
    threshold) for later allocations. Called after each big file. Over a 2-worker extraction of /usr/bin
    (one arena, see _one_arena) the peak was 658-687 MB with it and 774-778 without, for 0.3-0.5 s more
    CPU in ~13.5 (the pages given back are faulted in again by the next big file)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def extract_many(
    files: Iterable[str], policy: Policy, workers: int, stop: threading.Event | None = None
) -> Iterator[tuple[str, Document | None, SkippedFile | None]]:
    """Extract files on `workers` threads, yielding (path, document, problem) in input order. Once
    `stop` is set no further file is started; those already started are finished and yielded.

    Files are submitted ahead of the one yielded next while fewer than 2 per worker are pending, or
    fewer than PENDING_FILES per worker holding under PENDING_BYTES of input between them, so a big file
    at the head does not leave the other workers idle once they have finished the few files behind it
    (2 files per worker left a core idle for much of a run over /usr/lib). Only `workers` files are
    read at a time; the finished ones wait as documents, about a tenth of their bytes for binaries. A
    file counts at most PENDING_FILE_BYTES against the budget: the budget is for the documents waiting
    behind the head, and a 300 MB file at the head (streamed, not held) used to exhaust it alone and
    idle the other workers for the seconds it took (a core idle for 3.4 s of an 11 s run over /usr/lib).
    Big files share a budget of memory (_Held)."""
    _one_arena()

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    pending: deque[tuple[str, Future, int]] = deque()
    pending_bytes = 0
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-extract") as pool,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sspry-halves") as helpers,
    ):
        halves = helpers if workers > 1 else None
        held = _Held()
        for path in files:
            if stopped():
                break
            try:
                full = os.stat(path).st_size
            except OSError:
                full = 0  # extract_file reports the problem
            size = min(full, PENDING_FILE_BYTES)
            pending.append((path, pool.submit(_extract_held, held, full, path, policy, halves), size))
            pending_bytes += size
            while not stopped() and (
                len(pending) >= 2 * workers
                and (len(pending) >= PENDING_FILES * workers or pending_bytes >= PENDING_BYTES)
            ):
                done, future, size = pending.popleft()
                pending_bytes -= size
                yield _collect(done, future)
        cancelled = False
        while pending:
            if stopped() and not cancelled:  # submitted files not started yet are not started at all
                cancelled = True  # (the executor starts them in order: those left are the last ones)
                for _, future, _ in pending:
                    future.cancel()
            done, future, _ = pending.popleft()
            if not future.cancelled():
                yield _collect(done, future)


def _collect(path: str, future: Future) -> tuple[str, Document | None, SkippedFile | None]:
    try:
        return path, future.result(), None
    except SkippedFile as problem:
        return path, None, problem
