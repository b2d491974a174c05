"""The REST API and the page of `sspry web` (FastAPI), over a store factory: `sspry.Database.open(root)`
or `sspry.connect(addrs, ...)`, one store per job and per call, so the same code serves an embedded
Forest and servers. The API is described at /openapi.json; errors are `{"error": "one line"}` with a
proper status (400 bad input, 401 no or wrong token, 403 downloads off, 404 unknown, 409 conflict).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import hmac
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from sspry.web.jobs import ACTIVE, JobRunner, JobStore, UnknownJob, candidate_json

MAX_RULE_BYTES = 64 << 20  # a rule text larger than this is refused (the Yara-Rules bundle is ~15 MB)
PAGE_LIMIT = 1000  # candidates per page at most
HASHES = {"md5", "sha1", "sha256", "sha512"}
ExternalValue = bool | int | float | str


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@dataclass
class WebSettings:
    target: str  # what the page says it searches: "forest /path" or "servers a:1,b:2"
    mode: Literal["root", "servers"]
    max_jobs: int = 2
    token: str | None = None
    allow_download: bool = False


class SearchRequest(BaseModel):
    rule: str = Field(description="YARA rule text (every public rule is searched); no include directives")
    verify: bool = Field(
        False, description="Scan the candidates with YARA (needs a forest with stored paths)"
    )
    max_candidates: float = Field(
        0.0, ge=0, le=100, description="List at most this percent of the documents per rule (0: no cap)"
    )
    limit: int | None = Field(None, ge=1, description="List at most this many candidates per rule")
    externals: dict[str, ExternalValue] = Field(
        default_factory=dict, description="External variables of the rules (as `-d NAME=VALUE`)"
    )
    engine: Literal["yara", "yara-x"] = Field("yara", description="What verifies: yara-python or yara-x")


class RuleCheckRequest(BaseModel):
    rule: str
    externals: dict[str, ExternalValue] = Field(default_factory=dict)


class Created(BaseModel):
    id: str


class RuleCount(BaseModel):
    rule: str
    candidate_count: int
    listed: int
    verified_count: int | None
    truncated: bool
    notes: list[str] = []


class CandidateOut(BaseModel):
    rule: str
    source_id: str
    paths: list[str]
    path_count: int
    verified: bool | None
    matches: list[dict[str, Any]] | None
    skipped: str | None = None
    skip_detail: str | None = None


class CandidatePage(BaseModel):
    total: int
    offset: int
    candidates: list[CandidateOut]


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    title: str
    created: str
    started: str | None
    finished: str | None
    elapsed_ms: float | None
    first_result_ms: float | None
    options: dict[str, Any]
    error: str | None
    documents: int | None
    rule_total: int | None
    rules_done: int
    candidate_total: int
    verified_total: int | None
    progress: dict[str, Any] | None = None
    rules: list[RuleCount] | None = None
    rules_matching: int | None = None
    summary: dict[str, Any] | None = None
    rule: str | None = None


class JobList(BaseModel):
    total: int
    searches: list[Job]


class Cancelled(BaseModel):
    id: str
    status: str


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


def _refused(message: str, rule: str) -> ApiError:
    """YARA's refusal as a 400, with the line it names (YARA says line 0 of an error at the end)."""
    message = " ".join(message.split())
    line = re.search(r"\bline (\d+)\b", message)
    where = min(max(int(line.group(1)), 1), rule.count("\n") + 1) if line else None
    if not message.startswith(("invalid YARA rule", "cannot compile")):
        message = f"invalid YARA rule: {message}"
    return ApiError(400, message, line=where)


def public_rules(rule: str, externals: dict, judge: Callable[[], list]) -> list[str]:
    """The public rules of the rule text, or ApiError why it cannot be searched. It is compiled as the
    library loads a namespace (`sspry.query.rules.judged`: yara-python, or yara-x for modules only it
    has) with includes disabled: a web user must not make the server read its files. yara-x does not
    say which rules are private, so then the library's check (`judge()`) names the public ones."""
    from sspry.query.rules import DEFAULT_NAMESPACE, RuleError, Spec, judged

    if len(rule.encode("utf-8", "surrogatepass")) > MAX_RULE_BYTES:
        raise ApiError(400, f"the rule text is larger than {MAX_RULE_BYTES >> 20} MiB")
    if not rule.strip():
        raise ApiError(400, "the rule text is empty")
    try:
        engine, compiled = judged(Spec(DEFAULT_NAMESPACE, text=rule), externals, includes=False)
        if engine == "yara":
            names = [r.identifier for r in compiled if not r.is_private]  # type: ignore[attr-defined]
        else:
            names = [r.plan.name for r in judge() if not r.private]
    except RuleError as exc:
        message = str(exc)
        if "includes are disabled" in message:
            message += ": include directives are not accepted here, paste the included rules"
        raise _refused(message, rule) from exc
    if not names:
        raise ApiError(400, "the rule text has no public rule to search")
    return names


def create_app(
    open_store: Callable, settings: WebSettings, jobs: JobStore, runner: JobRunner | None = None
) -> FastAPI:
    """The ASGI application. `open_store()` gives a fresh Database or Cluster (closed after use)."""
    runner = runner or JobRunner(jobs, open_store, settings.max_jobs)
    policy: dict = {}  # the store's policy, once read

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(
        title="sspry web",
        version="1",
        description="Submit YARA rules to an sspry index, follow the jobs, page through and export matches.",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: the schema is at /openapi.json
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runner = runner

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}" if where else first.get("msg")}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(UnknownJob)
    async def unknown(request: Request, exc: UnknownJob):
        return JSONResponse({"error": f"no search {exc.args[0]}"}, status_code=404)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        """What the store raised (servers offline, a forest gone): one line, 502 when servers failed."""
        from_servers = any(c.__name__ == "ClientError" for c in type(exc).__mro__)  # not importing grpc
        status = 502 if from_servers else 500
        return JSONResponse({"error": " ".join(str(exc).split()) or type(exc).__name__}, status_code=status)

    if not settings.token:
        # Without a token the server listens on loopback only; refusing other Host names keeps a web page
        # elsewhere from reaching it through DNS rebinding.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"])

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.token and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), settings.token):
                return JSONResponse(
                    {"error": "a valid 'Authorization: Bearer TOKEN' header is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        response = await call_next(request)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def check(rule: str, externals: dict) -> list:
        """The store's rule check (sspry.RuleError if the rules cannot be used)."""
        store = open_store()
        try:
            return store.check(rule=rule, externals=externals or None)
        finally:
            store.close()

    def store_policy() -> dict:
        if not policy:
            store = open_store()
            try:
                info = store.info()
            finally:
                store.close()
            first = info[0] if isinstance(info, list) else info
            policy.update(first.get("policy", {}))
        return policy

    def job_json(row, detail: bool = False, **rules_query) -> dict:
        out = {
            "id": row["id"],
            "status": row["status"],
            "title": row["title"],
            "created": _iso(row["created"]),
            "started": _iso(row["started"]),
            "finished": _iso(row["finished"]),
            "elapsed_ms": row["elapsed_ms"],
            "first_result_ms": row["first_result_ms"],
            "options": json.loads(row["options"]),
            "error": row["error"],
            "documents": row["documents"],
            "rule_total": row["rule_total"],
            "rules_done": row["rules_done"],
            "candidate_total": row["candidate_total"],
            "verified_total": row["verified_total"],
        }
        if row["rule_total"] and row["rule_total"] > 1:  # the public rules, now they are known
            out["title"] = f"{row['title'].split(' (+')[0]} (+{row['rule_total'] - 1} more)"
        live = runner.progress(row["id"])
        if live is not None:
            out["progress"] = live
            out["rules_done"] = max(out["rules_done"], live["rules_done"])
            out["rule_total"] = out["rule_total"] or live["rules_total"]
        elif detail and row["progress"]:
            out["progress"] = json.loads(row["progress"])
        if row["status"] == "running" and row["started"]:
            out["elapsed_ms"] = (datetime.datetime.now(datetime.UTC).timestamp() - row["started"]) * 1000
        if detail:
            matching, rules = jobs.rules(row["id"], **rules_query)
            out["rules_matching"] = matching
            out["rules"] = [
                {
                    "rule": r["name"],
                    "candidate_count": r["candidate_count"],
                    "listed": r["listed"],
                    "verified_count": r["verified_count"],
                    "truncated": bool(r["truncated"]),
                    "notes": json.loads(r["notes"]) if r["notes"] else [],
                }
                for r in rules
            ]
            out["summary"] = json.loads(row["summary"]) if row["summary"] else None
            out["rule"] = row["rule"]
        return out

    # --- searches -------------------------------------------------------------------------------------
    @app.post("/api/searches", status_code=201, response_model=Created, tags=["searches"])
    def submit(body: SearchRequest) -> dict:
        """Queue a search of the rule text. 400 with YARA's message (and `line`) if it does not compile."""
        names = public_rules(body.rule, body.externals, lambda: check(body.rule, body.externals))
        if body.verify and not store_policy().get("store_path", True):
            raise ApiError(400, "--verify needs a forest that stores paths (created with --store-path)")
        options = body.model_dump(exclude={"rule"})
        return {"id": runner.submit(body.rule, options, names)}

    @app.get("/api/searches", response_model=JobList, tags=["searches"])
    def recent(
        limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0
    ) -> dict:
        """The most recent searches first."""
        total, rows = jobs.recent(limit, offset)
        return {"total": total, "searches": [job_json(r) for r in rows]}

    @app.get(
        "/api/searches/{job_id}", response_model=Job, response_model_exclude_none=False, tags=["searches"]
    )
    def status(
        job_id: str,
        rules_offset: Annotated[int, Query(ge=0)] = 0,
        rules_limit: Annotated[int | None, Query(ge=0)] = None,
        only_hits: bool = False,
        rule_name: str | None = None,
        include_rule: bool = False,
    ) -> dict:
        """A search's status, progress and per-rule counts (`rules_limit`/`rules_offset` page the rules,
        `only_hits` keeps those with candidates, `rule_name` those whose name holds it; `rules_matching`
        counts them); `include_rule=true` adds the rule text."""
        out = job_json(
            jobs.get(job_id),
            detail=True,
            offset=rules_offset,
            limit=rules_limit,
            only_hits=only_hits,
            name_has=rule_name,
        )
        if not include_rule:
            out["rule"] = None
        return out

    @app.get("/api/searches/{job_id}/candidates", response_model=CandidatePage, tags=["searches"])
    def candidates(
        job_id: str,
        rule: str | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT)] = 50,
        verified: bool | None = None,
    ) -> dict:
        """A page of the candidates of one rule (`rule=NAME`) or of all, in rule order; `verified=true`
        keeps the verified matches."""
        jobs.get(job_id)
        index = _rule_index(job_id, rule)
        total, rows = jobs.candidates(job_id, index, verified, offset, limit)
        return {"total": total, "offset": offset, "candidates": [candidate_json(r) for r in rows]}

    def _rule_index(job_id: str, rule: str | None) -> int | None:
        if rule is None:
            return None
        index = jobs.rule_index(job_id, rule)
        if index is None:
            raise ApiError(404, f"search {job_id} has no result for rule {rule!r} (yet)")
        return index

    @app.get(
        "/api/searches/{job_id}/export",
        tags=["searches"],
        responses={200: {"content": {"text/csv": {}, "application/json": {}}}},
    )
    def export(
        job_id: str,
        format: Literal["csv", "json"] = "csv",
        rule: str | None = None,
        verified: bool | None = None,
    ) -> Response:
        """Every candidate (of one rule, or all) as CSV (rule, source_id, verified, paths, matches) or
        JSON."""
        jobs.get(job_id)
        index = _rule_index(job_id, rule)
        name = f"sspry-{job_id}" + (f"-{rule}" if rule else "")

        def rows() -> Iterator[dict]:
            return (candidate_json(r) for r in jobs.iter_candidates(job_id, index, verified))

        if format == "json":

            def as_json() -> Iterator[str]:
                yield '{"search": ' + json.dumps(job_id) + ', "candidates": ['
                for number, row in enumerate(rows()):
                    yield ("," if number else "") + "\n" + json.dumps(row)
                yield "\n]}\n"

            return StreamingResponse(
                as_json(),
                media_type="application/json",
                headers={"Content-Disposition": f'attachment; filename="{name}.json"'},
            )

        def as_csv() -> Iterator[str]:
            buffer = io.StringIO()
            out = csv.writer(buffer)
            out.writerow(["rule", "source_id", "verified", "paths", "matches"])
            for row in rows():
                matches = row["matches"] or []
                out.writerow(
                    [
                        row["rule"],
                        row["source_id"],
                        "" if row["verified"] is None else str(row["verified"]).lower(),
                        "|".join(row["paths"]),
                        " ".join(f"{m['identifier']}@{m['offset']}" for m in matches),
                    ]
                )
                if buffer.tell() > 1 << 16:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        return StreamingResponse(
            as_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )

    @app.delete("/api/searches/{job_id}", response_model=Cancelled, tags=["searches"])
    def cancel(job_id: str, purge: bool = False) -> dict:
        """Cancel a queued or running search (the results so far are kept). `purge=true` removes a search
        that has ended, with its results, from the history."""
        row = jobs.get(job_id)
        if purge:
            if row["status"] in ACTIVE:
                raise ApiError(409, f"search {job_id} is {row['status']}: cancel it before purging it")
            jobs.purge(job_id)
            return {"id": job_id, "status": "purged"}
        if row["status"] not in ACTIVE:
            raise ApiError(409, f"search {job_id} is {row['status']}: there is nothing to cancel")
        return {"id": job_id, "status": runner.cancel(job_id)}

    # --- the rest ------------------------------------------------------------------------------------
    @app.get("/api/info", tags=["index"])
    def info() -> dict:
        """What the web server searches: the forest's or every server's statistics and policy."""
        store = open_store()
        try:
            found = store.info()
        finally:
            store.close()
        servers = found if isinstance(found, list) else [found]
        return {
            "mode": settings.mode,
            "target": settings.target,
            "documents": sum(s.get("documents", 0) for s in servers),
            "allow_download": settings.allow_download,
            "max_jobs": settings.max_jobs,
            "store_path": bool(servers[0].get("policy", {}).get("store_path")) if servers else False,
            "info": found,
        }

    @app.post("/api/rule-check", tags=["index"])
    def rule_check(body: RuleCheckRequest) -> dict:
        """How each rule would be searched (`sspry rule-check`): status, grams and findings with their
        line. 400 with YARA's message (and `line`) if the text does not compile."""
        reports: list = []

        def judge() -> list:
            reports.extend(check(body.rule, body.externals))
            return reports

        public_rules(body.rule, body.externals, judge)
        if not reports:  # yara-python compiled it: the library has not been asked yet
            judge()
        return {"rules": [r.to_json() for r in reports]}

    @app.get(
        "/api/files/{source_id}",
        tags=["index"],
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def download(source_id: str) -> Response:
        """An indexed file, read from one of the paths its search results recorded (never any other path),
        checked against its Source ID. Off unless the web server runs with --allow-download."""
        if not settings.allow_download:
            raise ApiError(403, "downloads are off: start sspry web with --allow-download")
        source_id = source_id.lower()
        if not re.fullmatch(r"[0-9a-f]{8,128}", source_id):
            raise ApiError(400, f"not a Source ID: {source_id!r}")
        paths = jobs.paths_of(source_id)
        if not paths:
            raise ApiError(404, f"no search result names the document {source_id}")
        id_source = store_policy().get("id_source")
        problems = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    digest = hashlib.file_digest(handle, id_source) if id_source in HASHES else None
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror}")
                continue
            if digest is not None and digest.hexdigest() != source_id:
                problems.append(f"{path}: changed since it was indexed")
                continue
            return FileResponse(
                path,
                media_type="application/octet-stream",
                filename=source_id,
                content_disposition_type="attachment",
            )
        raise ApiError(409, f"no stored path of {source_id} holds it now: " + "; ".join(problems))

    # --- the page -------------------------------------------------------------------------------------
    static = resources.files("sspry.web") / "static"

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return FileResponse(os.fspath(static / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=os.fspath(static)), name="static")
    return app
