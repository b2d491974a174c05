#!/usr/bin/env python3
"""Fault harness: crash the store and fill its disk at every step of its writes, then check that nothing
acknowledged was lost and that the forest works again by itself.

  scripts/fault_harness.py [--points N] [--budgets N] [--only SCENARIOS] [--seed S] [--dir D] [--json OUT]

Scenarios (all by default; --only kill,server,enospc,tmpfs,poison):
  kill    a workload (ingest, dedup, publish, delete, compaction, delete by path) in a child process,
          SIGKILLed the count-th time it passes a named kill point (SSPRY_KILL_AT): N (point, count) pairs
  server  a real `sspry serve` SIGKILLed inside an insert, right after an acknowledged insert, inside a
          publish and inside an idle compaction (its Maintenance thread), then restarted
  enospc  the disk-full injector (sspry/store/diskio.py): the workload in process with the disk full after
          each of N byte budgets spread over what it writes, space freed, the work resumed without a
          restart; the same in child processes that SIGKILL themselves at the end; and a real server whose
          disk is full for 2 s under continuous inserts, which must publish everything by itself
  tmpfs   (root only, else skipped) a real server on a 64 MiB tmpfs filled to the last bytes, then freed;
          `sspry local index` on it: one line, then the same command completes
  poison  rows that once blocked every publish (170 x 400 field names in one shard; a logged row over a
          limit), through a real server

After each run: the forest opens; every acknowledged document is present exactly once; every acknowledged
delete stays deleted; then inserts, publishes, compaction and deletes work again. Exit status 1 if
anything acknowledged was lost or a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from sspry.client.connection import ClientError, Connection
from sspry.document import Document, path_key
from sspry.policy import Policy
from sspry.store import diskio
from sspry.store.errors import StorageFull
from sspry.store.filenames import log_name
from sspry.store.files import FileRecord
from sspry.store.forest import Forest
from sspry.store.ingest_log import LogWriter
from sspry.synthetic import random_document

POLICY = Policy(shards=2, store_path=True)

# Every kill point of the store (sspry/store/*.py, `kill_point(...)`), in the order a write passes them.
KILL_POINTS = (
    "ingest.checked",
    "log.created",
    "log.append.start",
    "log.append.torn",
    "log.append.written",
    "log.append.synced",
    "ingest.logged",
    "ingest.recorded",
    "dedup.checked",
    "dedup.recorded",
    "publish.start",
    "publish.deduped",
    "segment.columns",
    "segment.written",
    "segment.renamed",
    "publish.built",
    "manifest.synced",
    "manifest.renamed",
    "swap.done",
    "swap.removed",
    "publish.swapped",
    "publish.log_removed",
    "delete.start",
    "tombstone.synced",
    "tombstone.renamed",
    "delete.swapped",
    "delete.forgotten",
    "compact.start",
    "compact.built",
    "compact.swapped",
)
SERVER_KILLS = (  # (what, kill point and count in the server; None: SIGKILL right after an ack)
    ("inside an insert", "log.append.torn:3"),
    ("right after an ack", None),
    ("inside a publish", "segment.written:2"),
    ("inside a manifest swap", "manifest.renamed:2"),
    ("inside an idle compaction", "compact.built:1"),
)


# --- what was acknowledged ---------------------------------------------------------------------------
class Journal:
    """The workload's record of what it asked and what was acknowledged, one JSON line each, written
    before asking and after the answer (a SIGKILL loses nothing written: it is in the page cache)."""

    def __init__(self, path: Path):
        self.path = path
        self._out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the journal

    def begin(self, op: str, ids: list[bytes]) -> None:
        self._out.write(json.dumps({"op": op, "state": "begin", "ids": [i.hex() for i in ids]}) + "\n")

    def end(self, op: str, ids: list[bytes], state: str = "ack") -> None:
        self._out.write(json.dumps({"op": op, "state": state, "ids": [i.hex() for i in ids]}) + "\n")

    def close(self) -> None:
        self._out.close()


@dataclass
class Expect:
    present: set[bytes] = field(default_factory=set)  # acknowledged inserts
    absent: set[bytes] = field(default_factory=set)  # acknowledged deletes
    uncertain: set[bytes] = field(default_factory=set)  # asked, not answered (a crash or a failure)


def expectations(journal: Path) -> Expect:
    expect = Expect()
    open_ops: dict[str, list[bytes]] = {}
    for line in journal.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a record torn by the kill
        record = json.loads(line)
        ids = [bytes.fromhex(i) for i in record["ids"]]
        if record["state"] == "begin":
            open_ops[record["op"]] = ids
            continue
        open_ops.pop(record["op"], None)
        if record["state"] != "ack":
            expect.uncertain.update(ids)
        elif record["op"] == "insert":
            expect.present.update(ids)
            expect.absent.difference_update(ids)
        else:
            expect.absent.update(ids)
            expect.present.difference_update(ids)
    for ids in open_ops.values():
        expect.uncertain.update(ids)
    return expect


@dataclass
class Check:
    acked: int = 0  # acknowledged documents checked
    lost: int = 0  # acknowledged, not present
    duplicated: int = 0  # present more than once
    resurrected: int = 0  # acknowledged as deleted, present
    recovered: bool = False  # inserts, publish, compaction and delete worked afterwards
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.resurrected or self.problems) and self.recovered


def held(root: Path) -> Counter:
    with Forest.open(root) as forest:
        return Counter(
            view.reader.source_id(int(i))
            for view in forest.snapshot().views
            for i in range(view.reader.docs)
            if view.live[i]
        )


def check_forest(root: Path, expect: Expect, continue_work: bool = True) -> Check:
    """Open (recovering), publish what the logs hold, compare with what was acknowledged, then work."""
    check = Check()
    try:
        with Forest.open(root, writable=True) as forest:
            forest.publish()
        found = held(root)
    except Exception as exc:
        check.problems.append(f"forest did not open and publish: {type(exc).__name__}: {exc}")
        return check
    must = expect.present - expect.uncertain
    check.acked = len(must)
    check.lost = sum(1 for i in must if found[i] == 0)
    check.duplicated = sum(1 for count in found.values() if count > 1)
    check.resurrected = sum(1 for i in expect.absent - expect.uncertain if found[i])
    if continue_work:
        try:
            check.recovered = work_again(root)
        except Exception as exc:
            check.problems.append(f"could not work again: {type(exc).__name__}: {exc}")
    else:
        check.recovered = True
    return check


def work_again(root: Path) -> bool:
    """Insert, publish, compact, delete: all must work on the recovered forest."""
    rng = random.Random(f"work again: {root}")  # documents no workload makes
    docs = [random_document(POLICY, rng, path=f"/again/{i}") for i in range(6)]
    with Forest.open(root, writable=True) as forest:
        before = forest.snapshot().documents
        forest.ingest(docs)
        forest.publish()
        forest.compact(full=True)
        deleted = forest.delete([docs[0].source_id])
        after = forest.snapshot().documents
    found = held(root)
    return deleted == [True] and after == before + 5 and all(found[d.source_id] == 1 for d in docs[1:])


# --- the workload ------------------------------------------------------------------------------------
def workload(forest: Forest, journal: Journal, seed: int, tolerate: bool = False, on_full=None) -> int:
    """Ingest, dedup, publish, delete, compaction and delete by path, in an order that passes every kill
    point more than once. With `tolerate`, a step that fails on a full disk is journaled as failed, then
    `on_full()` is called (it may free the disk), and the workload goes on as inserts keep arriving;
    returns how many steps failed."""
    rng = random.Random(seed)
    batches = [[random_document(POLICY, rng, path=f"/w/{b}/{i}") for i in range(6)] for b in range(9)]
    failures = 0

    def failed() -> None:
        nonlocal failures
        failures += 1
        if on_full is not None:
            on_full()

    def step(op: str, ids: list[bytes], call) -> object:
        journal.begin(op, ids)
        try:
            result = call()
        except StorageFull:
            if not tolerate:
                raise
            journal.end(op, ids, "failed")
            failed()
            return None
        journal.end(op, ids)
        return result

    def insert(docs: list[Document]) -> None:
        step("insert", [d.source_id for d in docs], lambda: forest.ingest(docs))

    def delete(docs: list[Document]) -> None:
        step("delete", [d.source_id for d in docs], lambda: forest.delete([d.source_id for d in docs]))

    def quiet(call) -> None:  # publish and compaction: no acknowledgement of rows
        try:
            call()
        except StorageFull:
            if not tolerate:
                raise
            failed()

    insert(batches[0])
    insert(batches[1])
    quiet(forest.publish)
    insert(batches[2] + batches[0][:2])  # two duplicates of published documents
    again = batches[1][:3]  # found again at new paths: recorded, nothing logged
    step(
        "insert",
        [d.source_id for d in again],
        lambda: forest.record_files(
            [d.source_id for d in again],
            [forest_record(d, f"/again-path/{i}") for i, d in enumerate(again)],
        ),
    )
    quiet(forest.publish)
    delete(batches[0][2:5])
    for batch in batches[3:7]:
        insert(batch)
        quiet(forest.publish)
    quiet(lambda: forest.compact(full=False))
    target = batches[3][0]
    journal.begin("delete-path", [target.source_id])
    try:
        (gone,) = forest.delete_paths([target.path])
        journal.end("delete-path", [target.source_id] if gone.document_deleted else [])
    except StorageFull:
        if not tolerate:
            raise
        journal.end("delete-path", [target.source_id], "failed")
        failed()
    insert(batches[7])
    quiet(lambda: forest.compact(full=True))
    insert(batches[8])  # left in the log
    return failures


def forest_record(doc: Document, path: str) -> FileRecord:
    return FileRecord(path_key(path), path, doc.source_id, doc.filesize, 1)


def run_child(root: Path, journal: Path, seed: int, kill_at: str | None, enospc: str | None = None) -> int:
    """Run the workload in a child process; returns its exit status (-9: killed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSPRY_KILL_AT", diskio.ENOSPC_ENV)}
    if kill_at:
        env["SSPRY_KILL_AT"] = kill_at
    if enospc:
        env[diskio.ENOSPC_ENV] = enospc
    command = [sys.executable, __file__, "_workload", str(root), str(journal), str(seed)]
    if enospc:
        command.append("--kill-at-end")
    return subprocess.run(command, env=env, capture_output=True, timeout=300).returncode


def child_main(root: str, journal_path: str, seed: int, kill_at_end: bool) -> None:
    journal = Journal(Path(journal_path))
    with Forest.open(root, writable=True) as forest:
        # under SSPRY_FAULT_ENOSPC, steps fail until the disk is freed: the workload goes on
        workload(forest, journal, seed, tolerate=kill_at_end)
        if kill_at_end:  # finding 1: an append torn by a full disk, a row acknowledged after it, SIGKILL
            rng = random.Random(seed + 1)
            for budget in (None, 40, None):
                docs = [random_document(POLICY, rng, path=f"/late/{rng.random()}") for _ in range(3)]
                diskio.fail_after(budget) if budget is not None else diskio.free()
                journal.begin("insert", [d.source_id for d in docs])
                try:
                    forest.ingest(docs)
                    journal.end("insert", [d.source_id for d in docs])
                except StorageFull:
                    journal.end("insert", [d.source_id for d in docs], "failed")
            os.kill(os.getpid(), signal.SIGKILL)  # a restart knows only the logs


def crash_image(root: Path) -> Path:
    """What a SIGKILL right now would leave: a copy of the forest's files as they are."""
    image = root.with_name(root.name + "-crash")
    shutil.copytree(root, image, ignore=shutil.ignore_patterns(".lock"))
    return image


# --- scenarios ---------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    case: str
    reached: bool  # the fault happened (the kill point was reached, the disk was full)
    faults: int
    check: Check

    def line(self) -> str:
        c = self.check
        status = "ok" if c.ok else "FAIL " + "; ".join(c.problems)
        return (
            f"{self.scenario:7} {self.case:42.42} {'yes' if self.reached else 'no':7} {self.faults:6} "
            f"{c.acked:6} {c.lost:4} {c.duplicated:4} {c.resurrected:4}  {status}"
        )


def census(base: Path, seed: int) -> Counter:
    """How many times the workload passes each kill point (run in process, the points counted)."""
    import importlib

    passed: Counter = Counter()
    modules = [
        importlib.import_module(f"sspry.store.{m}") for m in ("forest", "ingest_log", "segment.writer")
    ]
    modules.append(importlib.import_module("sspry.store.killpoints"))
    saved = [m.kill_point for m in modules]
    root = base / "census"
    Forest.init(root, POLICY)
    for module in modules:
        module.kill_point = lambda name: passed.update([name])
    try:
        with Forest.open(root, writable=True) as forest:
            workload(forest, Journal(base / "census.journal"), seed)
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.kill_point = original
    return passed


def kill_cases(passed: Counter, points: int) -> list[str]:
    """`points` (name, count) pairs, round-robin over the kill points: each point first at a pass in
    the middle of the workload, then at its last, its first, then the quarters."""
    spreads = {}
    for name in KILL_POINTS:
        n = passed[name]
        order = [n // 2 + 1, n, 1, n // 4 + 1, 3 * n // 4 + 1, n // 8 + 1, 7 * n // 8 + 1]
        spreads[name] = list(dict.fromkeys(c for c in order if 1 <= c <= n))
    cases = []
    for rank in range(max(len(v) for v in spreads.values())):
        cases += [f"{name}:{counts[rank]}" for name, counts in spreads.items() if rank < len(counts)]
    return cases[:points]


def kill_case(base: Path, case: str, seed: int) -> Row:
    """The workload in a child process SIGKILLed at `case` ("point:count"), then the checks."""
    root = base / f"kill-{case.replace(':', '-')}"
    Forest.init(root, POLICY)
    journal = root.with_name(root.name + ".journal")
    status = run_child(root, journal, seed, case)
    check = check_forest(root, expectations(journal))
    killed = status == -signal.SIGKILL
    return Row("kill", case, killed, int(killed), check)


def scenario_kill(base: Path, points: int, seed: int) -> Iterator[Row]:
    passed = census(base, seed)
    never = [name for name in KILL_POINTS if not passed[name]]
    if never:
        raise SystemExit(f"the workload never passes kill points {never}")
    for case in kill_cases(passed, points):
        yield kill_case(base, case, seed)


def free_after(failures: int):
    """An `on_full` for the workload: the disk is freed once `failures` steps have failed on it, and the
    steps after that must work, without a restart."""
    seen = [0]

    def on_full() -> None:
        seen[0] += 1
        if seen[0] == failures:
            diskio.free()

    return on_full


def workload_bytes(base: Path, seed: int) -> int:
    """How many bytes the workload writes through the store's file layer."""
    probe = base / "probe"
    Forest.init(probe, POLICY)
    diskio.fail_after(1 << 40)
    with Forest.open(probe, writable=True) as forest:
        workload(forest, Journal(base / "probe.journal"), seed)
    total = (1 << 40) - diskio.remaining()
    diskio.free()
    return total


def enospc_case(base: Path, budget: int, seed: int) -> Row:
    """The workload in process with the disk full after `budget` bytes: steps fail until two have, then
    space is freed and the rest must work, and the same forest must publish everything acknowledged
    without a restart; then the checks (after a reopen)."""
    root = base / f"full-{budget}"
    Forest.init(root, POLICY)
    journal_path = root.with_name(root.name + ".journal")
    journal = Journal(journal_path)
    before = diskio.injected_failures()
    problems = []
    with Forest.open(root, writable=True) as forest:
        diskio.fail_after(budget)
        workload(forest, journal, seed, tolerate=True, on_full=free_after(2))
        diskio.free()
        image = crash_image(root)  # killed now, a restart would have to find everything on disk
        try:
            forest.publish()
            forest.compact(full=False)
            expect = expectations(journal_path)
            live = Counter(
                v.reader.source_id(int(i))
                for v in forest.snapshot().views
                for i in range(v.reader.docs)
                if v.live[i]
            )
            missing = [i for i in expect.present - expect.uncertain if not live[i]]
            if missing:
                problems.append(f"{len(missing)} acknowledged documents not published without a restart")
        except Exception as exc:
            problems.append(f"no recovery without a restart: {type(exc).__name__}: {exc}")
    journal.close()
    faults = diskio.injected_failures() - before
    check = check_forest(root, expectations(journal_path))
    crashed = check_forest(image, expectations(journal_path), continue_work=False)
    check.lost += crashed.lost
    check.duplicated += crashed.duplicated
    check.resurrected += crashed.resurrected
    check.problems += problems + [f"crash image: {p}" for p in crashed.problems]
    return Row("enospc", f"in process, full after {budget} B", faults > 0, faults, check)


def enospc_child_case(base: Path, budget: int, seed: int) -> Row:
    """The workload in a child whose disk is full after `budget` bytes for 0.2 s; then finding 1: an
    append torn by a full disk, a row acknowledged after it, and the child SIGKILLs itself. A restart
    must find every acknowledged row."""
    root = base / f"fullkill-{budget}"
    Forest.init(root, POLICY)
    journal = root.with_name(root.name + ".journal")
    status = run_child(root, journal, seed, None, enospc=f"{budget}:0.2")
    check = check_forest(root, expectations(journal))
    return Row("enospc", f"child, full after {budget} B, then SIGKILL", status == -signal.SIGKILL, 1, check)


def scenario_enospc(base: Path, budgets: int, seed: int) -> Iterator[Row]:
    total = workload_bytes(base, seed)
    for number in range(budgets):
        yield enospc_case(base, total * number // budgets, seed)
    children = max(1, budgets // 8)
    for number in range(children):
        yield enospc_child_case(base, total * (2 * number + 1) // (2 * children), seed)


class Server:
    """A real `sspry serve` process. Every one started is killed when the harness ends (`kill_all`)."""

    started: ClassVar[list[Server]] = []

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        clean = {k: v for k, v in os.environ.items() if k not in ("SSPRY_KILL_AT", diskio.ENOSPC_ENV)}
        command = [sys.executable, "-m", "sspry", "serve", "--root", str(root), "--addr", "127.0.0.1:0"]
        self.process = subprocess.Popen(
            command, env={**clean, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line}{self.process.stderr.read()}")
        self.addr = line.rsplit(" ", 1)[1].strip()
        self.connection = Connection(self.addr, timeout=30)
        Server.started.append(self)

    @classmethod
    def kill_all(cls) -> None:
        for server in cls.started:
            if server.alive():
                server.kill()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        self.connection.close()

    def stop(self) -> str:
        """Stop gracefully; returns what it printed."""
        self.connection.close()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        return out

    def documents(self) -> int:
        return json.loads(self.connection.info().json)["documents"]


def insert_through(server: Server, journal: Journal, docs: list[Document]) -> bool:
    ids = [d.source_id for d in docs]
    journal.begin("insert", ids)
    try:
        server.connection.insert([d.to_row() for d in docs])
    except ClientError:
        journal.end("insert", ids, "failed")
        return False
    journal.end("insert", ids)
    return True


def server_kill_case(base: Path, what: str, kill_at: str | None, seed: int) -> Row:
    """A real server SIGKILLed at `kill_at` (None: right after an acknowledged insert) while a client
    inserts in batches with pauses (the maintenance thread publishes, then compacts), then restarted."""
    policy = Policy(shards=1, store_path=True)  # one shard: four publishes make a compaction
    root = base / f"server-{what.replace(' ', '-')}"
    Forest.init(root, policy)
    journal_path = root.with_name(root.name + ".journal")
    journal = Journal(journal_path)
    rng = random.Random(seed)
    server = Server(root, {"SSPRY_KILL_AT": kill_at} if kill_at else None)
    for batch in range(6):
        docs = [random_document(policy, rng, path=f"/s/{batch}/{i}") for i in range(4)]
        if not insert_through(server, journal, docs) or not server.alive():
            break
        if kill_at is None and batch == 2:
            server.kill()  # right after the ack
            break
        if batch in (1, 2, 3, 4):
            time.sleep(1.7)  # idle: the maintenance thread publishes, then compacts
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=10 if kill_at else 0.1)
    reached = server.process.returncode == -signal.SIGKILL
    server.kill()
    journal.close()
    restarted = Server(root)  # a restart recovers and keeps serving
    try:
        more = [random_document(policy, rng, path=f"/s/after/{i}") for i in range(3)]
        later = Journal(journal_path)
        inserted = insert_through(restarted, later, more)
        later.close()
        restarted.connection.publish()
        serving = inserted and restarted.documents() >= 3
    finally:
        restarted.stop()
    check = check_forest(root, expectations(journal_path))
    if not serving:
        check.problems.append("the restarted server did not take inserts")
    return Row("server", what, reached, 1, check)


def scenario_server(base: Path, seed: int) -> Iterator[Row]:
    for what, kill_at in SERVER_KILLS:
        yield server_kill_case(base, what, kill_at, seed)
    yield server_disk_full(base, seed)


def server_disk_full(base: Path, seed: int) -> Row:
    """A server whose disk is full for 2 s under continuous inserts publishes everything by itself."""
    root = base / "server-full"
    Forest.init(root, POLICY)
    journal_path = base / "server-full.journal"
    journal = Journal(journal_path)
    rng = random.Random(seed)
    server = Server(root, {diskio.ENOSPC_ENV: "40000:2"})
    failed = 0
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        docs = [random_document(POLICY, rng, path=f"/c/{rng.random()}") for _ in range(4)]
        failed += not insert_through(server, journal, docs)
        time.sleep(0.05)
    acked = len(expectations(journal_path).present)
    published = False
    for _ in range(120):  # no Publish call: the maintenance thread must retry until it works
        if server.documents() >= acked:
            published = True
            break
        time.sleep(0.25)
    server.kill()
    journal.close()
    out = server.process.stderr.read()  # the server's log
    check = check_forest(root, expectations(journal_path))
    if not published:
        check.problems.append("the server did not publish every acknowledged row by itself")
    if failed == 0:
        check.problems.append("no insert met the full disk")
    if not ("publish failed" in out and "publish works again" in out):
        check.problems.append("the maintenance thread did not log a failed publish and its recovery")
    return Row("server", f"disk full 2 s: {failed} inserts refused", failed > 0, failed, check)


def scenario_poison(base: Path, seed: int) -> list[Row]:
    """Rows that used to block every publish, through a real server: 170 rows of 400 distinct field
    names in one shard (field-name indexes overflowed 16 bits), and a logged row over a limit."""
    root = base / "poison"
    policy = Policy(shards=1, store_path=True)
    Forest.init(root, policy)
    rng = random.Random(seed)
    old = random_document(policy, rng, path="/old/row")
    old.fields = {f"pe.f{i}": i for i in range(600)}  # logged by an sspry without the limit
    writer = LogWriter(root / "ingest" / log_name(1))
    writer.append([old.to_row()])
    writer.close()
    journal_path = base / "poison.journal"
    journal = Journal(journal_path)
    server = Server(root)
    problems = []
    for start in range(0, 170, 34):
        docs = []
        for i in range(start, start + 34):
            doc = random_document(policy, rng, path=f"/p/{i}")
            doc.fields = {f"pe.f{i}_{j}": j for j in range(400)}
            docs.append(doc)
        if not insert_through(server, journal, docs):
            problems.append("poison rows refused")
    server.connection.publish()
    later = [random_document(policy, rng, path=f"/later/{i}") for i in range(5)]
    insert_through(server, journal, later)
    server.connection.publish()
    info = json.loads(server.connection.info().json)
    if info["documents"] != 175 or info["quarantined_rows"] != 1:
        problems.append(f"documents {info['documents']}, quarantined {info['quarantined_rows']}")
    server.stop()
    journal.close()
    check = check_forest(root, expectations(journal_path))
    check.problems += problems
    return [Row("poison", "170 x 400 field names + an old row over a limit", True, 171, check)]


def scenario_tmpfs(base: Path, seed: int) -> Iterator[Row]:
    """A real disk full: a 64 MiB tmpfs, filled to the last bytes by a file, then freed."""
    if os.geteuid() != 0:
        print("tmpfs: skipped (needs root to mount a tmpfs)", file=sys.stderr)
        return
    mount = base / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield tmpfs_server(mount, seed)
        yield tmpfs_local_index(mount, seed)
    finally:
        Server.kill_all()  # nothing of ours may keep the mount busy
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of `directory` with a file, leaving about `leave` bytes free."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for block in (b"\0" * (1 << 20), b"\0" * 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def tmpfs_server(mount: Path, seed: int) -> Row:
    root = mount / "served"
    Forest.init(root, POLICY)
    journal_path = mount.parent / "tmpfs.journal"
    journal = Journal(journal_path)
    rng = random.Random(seed)
    server = Server(root)
    sizes = (64, 128)  # blocks: ~12 KB per row, so the free space goes quickly
    filler = fill(mount, 200 << 10)
    failed = 0
    for _ in range(60):
        docs = [random_document(POLICY, rng, blocks=sizes, path=f"/t/{rng.random()}") for _ in range(4)]
        failed += not insert_through(server, journal, docs)
    filler.unlink()  # space comes back: no restart
    for _ in range(10):
        docs = [random_document(POLICY, rng, blocks=sizes, path=f"/t/{rng.random()}") for _ in range(4)]
        insert_through(server, journal, docs)
    acked = len(expectations(journal_path).present)
    published = False
    for _ in range(160):
        if server.documents() >= acked:
            published = True
            break
        time.sleep(0.25)
    server.kill()
    journal.close()
    check = check_forest(root, expectations(journal_path))
    if not published:
        check.problems.append("the server did not publish every acknowledged row once space was freed")
    if not failed:
        check.problems.append("no insert met the full disk")
    return Row("tmpfs", f"server, 64 MiB tmpfs full, {failed} inserts refused", failed > 0, failed, check)


def tmpfs_local_index(mount: Path, seed: int) -> Row:
    files = mount.parent / "tmpfs-files"
    files.mkdir()
    rng = random.Random(seed)
    for i in range(40):
        (files / f"f{i:03d}.bin").write_bytes(rng.randbytes(256 << 10))
    root = mount / "local"
    Forest.init(root, Policy(store_path=True))
    filler = fill(mount, 3 << 20)
    command = [sys.executable, "-m", "sspry", "local", "index", "--root", str(root), str(files)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    problems = []
    lines = [line for line in first.stderr.splitlines() if line.strip()]
    if first.returncode == 0 or "Traceback" in first.stderr or not lines[-1:]:
        problems.append(f"full disk not reported in one line: {first.returncode} {first.stderr[-300:]}")
    elif not (lines[-1].startswith("Error:") and lines[-1].endswith("No space left on device")):
        problems.append(f"unexpected message: {lines[-1]}")
    filler.unlink()
    second = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    if second.returncode != 0:
        problems.append(f"re-run failed: {second.stderr[-300:]}")
    found = held(root)
    check = Check(acked=40, lost=40 - len(found), duplicated=sum(c > 1 for c in found.values()))
    check.recovered = second.returncode == 0
    check.problems = problems
    return Row("tmpfs", "local index on a full tmpfs, then again", first.returncode != 0, 1, check)


# --- main --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _servers_killed():
    try:
        yield
    finally:
        Server.kill_all()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_workload":
        child_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--kill-at-end" in sys.argv)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=60, help="(kill point, count) pairs to crash at")
    parser.add_argument("--budgets", type=int, default=40, help="disk-full byte budgets (in process)")
    parser.add_argument("--only", default="kill,server,enospc,tmpfs,poison")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument(
        "--dir",
        default=None,
        help="where the forests go (default: the system's temporary directory; /dev/shm runs the kill "
        "scenario ~5x faster: a SIGKILL loses nothing in the page cache, so fsyncs only cost time there)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (servers, the tmpfs) on SIGTERM
    scenarios = args.only.split(",")
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sspry-faults-", dir=args.dir) as tmp, _servers_killed():
        base = Path(tmp)
        heading = f"{'scenario':7} {'case':42} {'fault':7} {'faults':>6} {'acked':>6}"
        print(f"{heading} {'lost':>4} {'dup':>4} {'res':>4}")
        for name, run in (
            ("kill", lambda: scenario_kill(base, args.points, args.seed)),
            ("server", lambda: scenario_server(base, args.seed)),
            ("enospc", lambda: scenario_enospc(base, args.budgets, args.seed)),
            ("tmpfs", lambda: scenario_tmpfs(base, args.seed)),
            ("poison", lambda: scenario_poison(base, args.seed)),
        ):
            if name in scenarios:
                for row in run():
                    rows.append(row)
                    print(row.line(), flush=True)
    kills = [r for r in rows if r.scenario == "kill" or (r.scenario == "server" and "disk" not in r.case)]
    faults = [r for r in rows if r not in kills]
    by_scenario: Counter = Counter()
    for row in faults:
        by_scenario[row.scenario] += row.faults
    totals = {
        "runs": len(rows),
        "kill_points_run": len(kills),
        "kill_points_reached": sum(r.reached for r in kills),
        "faults_injected": sum(r.faults for r in faults),
        "faults_by_scenario": dict(by_scenario),
        "acked_documents_checked": sum(r.check.acked for r in rows),
        "acked_documents_lost": sum(r.check.lost for r in rows),
        "duplicated": sum(r.check.duplicated for r in rows),
        "resurrected_deletes": sum(r.check.resurrected for r in rows),
        "failed_checks": sum(not r.check.ok for r in rows),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(totals, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"totals": totals, "rows": [asdict(r) for r in rows]}, indent=1, default=str)
        )
    return 1 if totals["acked_documents_lost"] or totals["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
