"""The web server's searches: a SQLite job store in the state directory and the threads that run jobs.

A job is one rule text searched over the store (a `sspry.Database` or a `sspry.connect()` Cluster,
opened per job by a factory). Without verification the rule results are streamed (`store.stream`) and
written rule by rule, so a bundle of thousands of rules keeps memory flat and shows its first results
while the rest are searched; with verification `store.search(verify=True, details=("strings",))` runs
and its rules are written as they are collected. Progress comes from the library's `Progress`
callbacks (planning, searching, verifying) and is kept in memory while a job runs, in SQLite once it
ends. Cancelling sets an event the runner checks between rules and in every progress callback.

A restart keeps the history: queued jobs wait again, a job that was running starts over (its partial
rows dropped) unless it already was interrupted by a restart once, in which case it is marked failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sspry.progress import Progress, Stage

log = logging.getLogger("sspry.web")

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
MAX_ATTEMPTS = 2  # a job interrupted by this many restarts is marked failed instead of started again
COMMIT_SECONDS = 0.25  # a running job's rows are committed at least this often (and at its end)
COMMIT_ROWS = 50_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    status TEXT NOT NULL,
    title TEXT NOT NULL,
    rule TEXT NOT NULL,
    options TEXT NOT NULL,
    error TEXT,
    progress TEXT,
    documents INTEGER,
    rule_total INTEGER,
    rules_done INTEGER NOT NULL DEFAULT 0,
    candidate_total INTEGER NOT NULL DEFAULT 0,
    verified_total INTEGER,
    first_result_ms REAL,
    elapsed_ms REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    summary TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs(created);
CREATE TABLE IF NOT EXISTS rules (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    candidate_count INTEGER NOT NULL,
    listed INTEGER NOT NULL,
    verified_count INTEGER,
    truncated INTEGER NOT NULL,
    notes TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS candidates (
    job_id TEXT NOT NULL,
    rule_idx INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    source_id TEXT NOT NULL,
    verified INTEGER,
    skipped TEXT,
    details TEXT,
    PRIMARY KEY (job_id, rule_idx, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    job_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    paths TEXT NOT NULL,
    path_count INTEGER NOT NULL,
    PRIMARY KEY (job_id, source_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS documents_by_source ON documents(source_id);
"""


LIST_COLUMNS = (
    "id", "created", "started", "finished", "status", "title", "options", "error", "documents", "rule_total",
    "rules_done", "candidate_total", "verified_total", "first_result_ms", "elapsed_ms",
)  # fmt: skip


def title(names: list[str]) -> str:
    """What the job list shows of a rule text: its first public rule's name and how many more there are
    (`names`: the public rules, as YARA compiled them)."""
    if not names:
        return "(no rule)"
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def _candidate_filter(job_id: str, rule_idx: int | None, verified: bool | None) -> tuple[list[str], list]:
    """The WHERE terms (over `candidates c`) and their arguments for a job's candidates, of one rule
    and with one verdict when given."""
    where, args = ["c.job_id = ?"], [job_id]
    if rule_idx is not None:
        where.append("c.rule_idx = ?")
        args.append(rule_idx)
    if verified is not None:
        where.append("c.verified = ?")
        args.append(int(verified))
    return where, args


class JobCancelled(Exception):
    """Raised inside a running job once it is cancelled (or the web server stops)."""


class UnknownJob(KeyError):
    pass


class JobStore:
    """The jobs database (`jobs.sqlite3` in the state directory). One connection per thread."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        with self.connection() as db:
            db.executescript(SCHEMA)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def connection(self) -> sqlite3.Connection:
        """This thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- jobs ---------------------------------------------------------------------------------------
    def add(self, rule: str, options: dict, names: list[str]) -> str:
        job_id = secrets.token_hex(8)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, created, status, title, rule, options) "
                "VALUES (?, ?, 'queued', ?, ?, ?)",
                (job_id, time.time(), title(names), rule, json.dumps(options)),
            )
        return job_id

    def get(self, job_id: str) -> sqlite3.Row:
        row = self.connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return row

    def recent(self, limit: int, offset: int) -> tuple[int, list[sqlite3.Row]]:
        db = self.connection()
        total = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        columns = ", ".join(c for c in LIST_COLUMNS)
        rows = db.execute(
            f"SELECT {columns} FROM jobs ORDER BY created DESC, id LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
        return total, rows

    def queued(self) -> list[str]:
        rows = self.connection().execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created")
        return [r["id"] for r in rows]

    def update(self, job_id: str, **fields) -> None:
        names = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def start(self, job_id: str) -> bool:
        """queued -> running (False if it was cancelled meanwhile); partial rows of a previous try go."""
        with self.transaction() as db:
            status = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if status is None or status["status"] != "queued":
                return False
            for table, column in (("rules", "job_id"), ("candidates", "job_id"), ("documents", "job_id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
            db.execute(
                "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, rules_done = 0, "
                "candidate_total = 0, verified_total = NULL, error = NULL WHERE id = ?",
                (time.time(), job_id),
            )
        return True

    def recover(self) -> None:
        """After a restart: running jobs start over once, then are marked failed."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, "
                "error = 'interrupted by web server restarts; submit it again' "
                "WHERE status = 'running' AND attempts >= ?",
                (time.time(), MAX_ATTEMPTS),
            )
            db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")

    def purge(self, job_id: str) -> None:
        with self.transaction() as db:
            for table, column in (("rules", "job_id"), ("candidates", "job_id"), ("documents", "job_id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # --- results ------------------------------------------------------------------------------------
    def rules(
        self,
        job_id: str,
        offset: int = 0,
        limit: int | None = None,
        only_hits: bool = False,
        name_has: str | None = None,
    ) -> tuple[int, list[sqlite3.Row]]:
        """(how many rules match, those from `offset`): all, only those with candidates, only those whose
        name holds `name_has` (case-insensitive)."""
        where, args = ["job_id = ?"], [job_id]
        if only_hits:
            where.append("candidate_count > 0")
        if name_has:
            where.append("instr(lower(name), ?) > 0")
            args.append(name_has.lower())
        clause = " AND ".join(where)
        db = self.connection()
        total = db.execute(f"SELECT COUNT(*) FROM rules WHERE {clause}", args).fetchone()[0]
        rows = db.execute(
            f"SELECT * FROM rules WHERE {clause} ORDER BY idx LIMIT ? OFFSET ?",
            (*args, -1 if limit is None else limit, offset),
        ).fetchall()
        return total, rows

    def rule_index(self, job_id: str, name: str) -> int | None:
        row = (
            self.connection()
            .execute("SELECT idx FROM rules WHERE job_id = ? AND name = ?", (job_id, name))
            .fetchone()
        )
        return None if row is None else row["idx"]

    def candidates(
        self, job_id: str, rule_idx: int | None, verified: bool | None, offset: int, limit: int | None
    ) -> tuple[int, list[sqlite3.Row]]:
        where, args = _candidate_filter(job_id, rule_idx, verified)
        clause = " AND ".join(where)
        db = self.connection()
        if verified is None and rule_idx is not None:
            total = db.execute(
                "SELECT listed FROM rules WHERE job_id = ? AND idx = ?", (job_id, rule_idx)
            ).fetchone()
            total = total["listed"] if total else 0
        elif verified is None:
            total = db.execute("SELECT COALESCE(SUM(listed), 0) FROM rules WHERE job_id = ?", (job_id,))
            total = total.fetchone()[0]
        else:
            total = db.execute(f"SELECT COUNT(*) FROM candidates c WHERE {clause}", args).fetchone()[0]
        rows = db.execute(
            "SELECT r.name AS rule, c.source_id, c.verified, c.skipped, c.details, d.paths, d.path_count "
            "FROM candidates c JOIN rules r ON r.job_id = c.job_id AND r.idx = c.rule_idx "
            "LEFT JOIN documents d ON d.job_id = c.job_id AND d.source_id = c.source_id "
            f"WHERE {clause} ORDER BY c.rule_idx, c.pos LIMIT ? OFFSET ?",
            (*args, -1 if limit is None else limit, offset),
        ).fetchall()
        return total, rows

    def iter_candidates(
        self, job_id: str, rule_idx: int | None, verified: bool | None, batch: int = 5000
    ) -> Iterator[sqlite3.Row]:
        """Every candidate of the job (or of one rule), in order, read in batches by key (no OFFSET)."""
        where, args = _candidate_filter(job_id, rule_idx, verified)
        db = self._open()  # its own: a streamed response is read on whichever thread is free
        try:
            yield from self._batches(db, where, args, batch)
        finally:
            db.close()

    @staticmethod
    def _batches(db: sqlite3.Connection, where: list[str], args: list, batch: int) -> Iterator[sqlite3.Row]:
        after = (-1, -1)
        while True:
            rows = db.execute(
                "SELECT c.rule_idx, c.pos, r.name AS rule, c.source_id, c.verified, c.skipped, c.details, "
                "d.paths, d.path_count FROM candidates c "
                "JOIN rules r ON r.job_id = c.job_id AND r.idx = c.rule_idx "
                "LEFT JOIN documents d ON d.job_id = c.job_id AND d.source_id = c.source_id "
                f"WHERE {' AND '.join(where)} AND (c.rule_idx, c.pos) > (?, ?) "
                "ORDER BY c.rule_idx, c.pos LIMIT ?",
                (*args, *after, batch),
            ).fetchall()
            if not rows:
                return
            yield from rows
            after = (rows[-1]["rule_idx"], rows[-1]["pos"])

    def paths_of(self, source_id: str) -> list[str]:
        """Every path any job recorded for the document (what the index stored), newest job first."""
        rows = self.connection().execute(
            "SELECT d.paths FROM documents d JOIN jobs j ON j.id = d.job_id WHERE d.source_id = ? "
            "ORDER BY j.created DESC",
            (source_id,),
        )
        return list(dict.fromkeys(p for row in rows for p in json.loads(row["paths"])))


def candidate_json(row: sqlite3.Row) -> dict:
    out = {
        "rule": row["rule"],
        "source_id": row["source_id"],
        "paths": json.loads(row["paths"]) if row["paths"] else [],
        "path_count": row["path_count"] or 0,
        "verified": None if row["verified"] is None else bool(row["verified"]),
        "matches": None,
    }
    if row["skipped"]:
        out["skipped"] = row["skipped"]
    if row["details"]:
        details = json.loads(row["details"])
        out["matches"] = details.get("matches")
        if details.get("skip_detail"):
            out["skip_detail"] = details["skip_detail"]
        if details.get("matches_truncated"):
            out["matches_truncated"] = True
    return out


class _JobStage(Stage):
    def __init__(self, progress: JobProgress, entry: dict):
        self.progress, self.entry = progress, entry

    def advance(self, amount: int = 1) -> None:
        self.progress.check()
        self.entry["done"] += amount

    def close(self) -> None:
        self.entry["closed"] = True


class JobProgress(Progress):
    """What the library reports of one job, kept for `GET /api/searches/{id}`; raises JobCancelled in
    the job's thread once the job is cancelled."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.stages: list[dict] = []
        self.notes: list[str] = []
        self.rules_done = 0
        self.rules_total: int | None = None

    def check(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled()

    def stage(self, what: str, total: int | None, unit: str) -> Stage:
        self.check()
        entry = {"stage": what, "done": 0, "total": total, "unit": unit, "closed": False}
        self.stages.append(entry)
        return _JobStage(self, entry)

    def note(self, message: str) -> None:
        if len(self.notes) < 100:
            self.notes.append(message)

    def to_json(self) -> dict:
        current = next((s for s in reversed(self.stages) if not s["closed"]), None)
        return {
            "stage": current["stage"] if current else None,
            "rules_done": self.rules_done,
            "rules_total": self.rules_total,
            "stages": [dict(s) for s in self.stages],
            "notes": list(self.notes),
        }


class _Writer:
    """A running job's rows, committed in batches (every COMMIT_SECONDS or COMMIT_ROWS)."""

    def __init__(self, store: JobStore, job_id: str, created: float):
        self.store, self.job_id, self.created = store, job_id, created
        self.rules: list[tuple] = []
        self.candidates: list[tuple] = []
        self.documents: dict[str, tuple] = {}
        self.seen: set[str] = set()
        self.last_commit = time.monotonic()
        self.rules_done = 0
        self.candidate_total = 0
        self.verified_total: int | None = None
        self.first_result_ms: float | None = None
        self.counts: dict[int, int] = {}  # rule index -> its candidate count as written
        self.replaced: list[int] = []  # rules whose rows the next commit replaces

    def add(self, index: int, result, verified: bool) -> None:
        """A rule's result; written again (its verdicts), it replaces what was written of it."""
        listed = len(result.candidates)
        matched = sum(1 for c in result.candidates if c.verified) if verified else None
        again = index in self.counts
        if again:
            self.replaced.append(index)
        self.rules.append(
            (
                self.job_id,
                index,
                result.name,
                result.candidate_count,
                listed,
                matched,
                int(bool(result.truncated)),
                json.dumps(result.notes) if result.notes else None,
            )
        )
        for pos, candidate in enumerate(result.candidates):
            source_id = candidate.source_id.hex()
            details = dict(candidate.details or {})
            if candidate.skip_detail:
                details["skip_detail"] = candidate.skip_detail
            self.candidates.append(
                (
                    self.job_id,
                    index,
                    pos,
                    source_id,
                    None if candidate.verified is None else int(candidate.verified),
                    candidate.skipped,
                    json.dumps(details) if details else None,
                )
            )
            if source_id not in self.seen:
                self.seen.add(source_id)
                self.documents[source_id] = (
                    self.job_id,
                    source_id,
                    json.dumps(list(candidate.paths)),
                    candidate.path_count,
                )
        if not again:
            self.rules_done += 1
        self.candidate_total += result.candidate_count - self.counts.get(index, 0)
        self.counts[index] = result.candidate_count
        if matched is not None:
            self.verified_total = (self.verified_total or 0) + matched
        if self.first_result_ms is None:
            self.first_result_ms = (time.time() - self.created) * 1000
        if len(self.candidates) >= COMMIT_ROWS or time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        with self.store.transaction() as db:
            for index in self.replaced:
                db.execute("DELETE FROM rules WHERE job_id = ? AND idx = ?", (self.job_id, index))
                db.execute("DELETE FROM candidates WHERE job_id = ? AND rule_idx = ?", (self.job_id, index))
            db.executemany("INSERT INTO rules VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.rules)
            db.executemany("INSERT INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?)", self.candidates)
            db.executemany("INSERT OR IGNORE INTO documents VALUES (?, ?, ?, ?)", self.documents.values())
            db.execute(
                "UPDATE jobs SET rules_done = ?, candidate_total = ?, verified_total = ?, "
                "first_result_ms = COALESCE(first_result_ms, ?) WHERE id = ?",
                (
                    self.rules_done,
                    self.candidate_total,
                    self.verified_total,
                    self.first_result_ms,
                    self.job_id,
                ),
            )
        self.rules.clear()
        self.replaced.clear()
        self.candidates.clear()
        self.documents.clear()
        self.last_commit = time.monotonic()


class JobRunner:
    """Runs queued jobs, at most `max_jobs` at once, each over a store from `open_store()`."""

    def __init__(self, store: JobStore, open_store: Callable, max_jobs: int):
        self.store = store
        self.open_store = open_store
        self.max_jobs = max_jobs
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.live: dict[str, tuple[threading.Event, JobProgress]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._work, name=f"sspry-web-job-{n}", daemon=True)
            for n in range(max_jobs)
        ]

    def start(self) -> None:
        self.store.recover()
        for job_id in self.store.queued():
            self.queue.put(job_id)
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; running ones are interrupted and left `running`, to start over next time."""
        self.stopping.set()
        with self.lock:
            for cancel, _ in self.live.values():
                cancel.set()
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout)

    def submit(self, rule: str, options: dict, names: list[str]) -> str:
        """Queue a search of `rule` (`names`: its public rules, for the job's title)."""
        job_id = self.store.add(rule, options, names)
        self.queue.put(job_id)
        return job_id

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job; returns its status after the call."""
        with self.lock:
            live = self.live.get(job_id)
            if live is not None:
                live[0].set()
                return "cancelling"
        with self.store.transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            if row["status"] == "queued":
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id)
                )
                return "cancelled"
            return row["status"]

    def progress(self, job_id: str) -> dict | None:
        with self.lock:
            live = self.live.get(job_id)
        return live[1].to_json() if live else None

    def _work(self) -> None:
        while not self.stopping.is_set():
            job_id = self.queue.get()
            if job_id is None or self.stopping.is_set():
                return
            try:
                self._run(job_id)
            except Exception:  # the job is marked failed by _run; this is a bug in the runner itself
                log.exception("job %s", job_id)

    def _run(self, job_id: str) -> None:
        if not self.store.start(job_id):
            return
        row = self.store.get(job_id)
        cancel = threading.Event()
        progress = JobProgress(cancel)
        with self.lock:
            self.live[job_id] = (cancel, progress)
        options = json.loads(row["options"])
        writer = _Writer(self.store, job_id, row["created"])
        started = time.perf_counter()
        status, error, summary = "done", None, None
        try:
            summary = self._search(row["rule"], options, progress, writer)
        except JobCancelled:
            status = "cancelled"
        except Exception as exc:
            status, error = "failed", _one_line(exc)
        finally:
            with self.lock:
                del self.live[job_id]
        if status == "cancelled" and self.stopping.is_set():
            return  # left `running`: it starts over when the web server starts again
        try:
            writer.commit()
        except sqlite3.Error as exc:
            status, error = "failed", f"cannot store the results: {exc}"
        self.store.update(
            job_id,
            status=status,
            error=error,
            finished=time.time(),
            elapsed_ms=(time.perf_counter() - started) * 1000,
            progress=json.dumps(progress.to_json()),
            summary=json.dumps(summary) if summary is not None else None,
        )

    def _search(self, rule: str, options: dict, progress: JobProgress, writer: _Writer) -> dict:
        """Stream the rule results into the job's rows (its first results, unverified); with verify,
        then search again with verification (the plans are cached by now) and replace each rule's rows
        with the verdicts and matched strings."""
        asked = {
            "max_candidates": float(options.get("max_candidates") or 0.0),
            "limit": options.get("limit"),
            "externals": options.get("externals") or None,
            "progress": progress,
        }
        store = self.open_store()
        try:
            found = store.stream(rule=rule, **asked)
            progress.rules_total = len(found.targets)
            self.store.update(writer.job_id, documents=found.documents, rule_total=len(found.targets))
            results = iter(found)
            try:
                for index, result in enumerate(results):
                    progress.check()
                    writer.add(index, result, verified=False)
                    progress.rules_done = index + 1
            finally:
                close = getattr(results, "close", None)
                if close is not None:  # a stream's generator: lets a Cluster cancel its server calls
                    close()
            if not options.get("verify"):
                return found.summary_json()
            writer.commit()  # every candidate readable while verification runs
            engine = options.get("engine") or "yara"
            verified = store.search(rule=rule, verify=True, details=("strings",), engine=engine, **asked)
            writer.verified_total = 0
            for index, result in enumerate(verified.rules):
                progress.check()
                writer.add(index, result, verified=True)
            return verified.summary_json()
        finally:
            store.close()


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "…"
