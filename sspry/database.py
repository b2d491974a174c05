"""`sspry.Database`: a Forest in this process, with the calls the CLI's `local` commands make.

    with sspry.Database.create("db", store_path=True) as db:
        db.index(["/samples"])
        result = db.search(rule='rule x { strings: $a = "evil" condition: $a }', verify=True)

Reads never take the Forest's writer lock, so a Database can search a Forest a server is writing; the
first write (`index`, `delete`, `compact`) takes the lock and keeps it until `close()`.
`sspry.connect()` gives the same calls over servers (client/cluster.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from pathlib import Path

from sspry.deleting import Deletion, ForestDeleter, delete_values
from sspry.engines import DEFAULT_ENGINE
from sspry.indexing import IndexSummary, index_files
from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.externals import Externals
from sspry.query.literals import DEFAULT_MAX_ANCHORS
from sspry.query.plancache import PlanCache
from sspry.query.results import SearchResult, SearchStream
from sspry.query.rulecheck import RuleReport, check_rules
from sspry.query.rules import RulePaths, RuleText, load_for_search
from sspry.store.forest import CompactResult, Forest


class Database:
    """A Forest opened in this process. Use `create` or `open`; close it (or use `with`)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._reader = Forest.open(self.root, writable=False)
        self._writer: Forest | None = None
        self._lock = threading.Lock()
        self._plan_cache: PlanCache | None = None  # opened by the first search

    @classmethod
    def create(cls, root: Path | str, *, force: bool = False, **policy) -> Database:
        """Create a Forest at `root` with the given policy (`Policy` fields: store_path, gram_sizes,
        id_source, tier1_fp, ...) and open it. Creating one with the same policy again is a no-op."""
        Forest.init(Path(root), Policy(**policy), force=force)
        return cls(root)

    @classmethod
    def open(cls, root: Path | str) -> Database:
        """Open an existing Forest (ForestError if there is none)."""
        return cls(root)

    @property
    def policy(self) -> Policy:
        return self._reader.policy

    def _forest(self, write: bool = False) -> Forest:
        """The writable Forest once something was written (its snapshot is current), else the reader."""
        with self._lock:
            if write and self._writer is None:
                self._writer = Forest.open(self.root, writable=True)
            return self._writer or self._reader

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._reader.close()
            if self._plan_cache is not None:
                self._plan_cache.close()
                self._plan_cache = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the calls ---------------------------------------------------------------------------------
    def index(
        self,
        paths: list[str] | tuple[str, ...],
        *,
        path_list: bool = False,
        workers: int = 0,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> IndexSummary:
        """Index files (directories recursively) and publish. Files indexed before and unchanged since are
        not read again; setting `stop` ends the run early, keeping what was indexed."""
        from sspry.indexing import ForestSink

        return index_files(
            ForestSink(self._forest(write=True)),
            paths,
            path_list=path_list,
            workers=workers,
            progress=progress or SILENT,
            stop=stop,
        )

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
        workers: int = 0,
        progress: Progress | None = None,
    ) -> SearchResult:
        """Every document that may match each public rule of the rule text (`rule=`: a text, or a dict
        namespace -> text) or rule files (`path=`: one or a list of files and directories, each file in
        a namespace of its own; several namespaces name their rules `namespace:rule`);
        with `verify`, each candidate scanned by `engine` ("yara": yara-python, or "yara-x"), keeping of
        each match the `details` asked ("strings", "tags", "meta"). RuleError if YARA refuses the rules."""
        from sspry.verify import check_options, collect, needs_paths

        progress = progress or SILENT
        started = time.perf_counter()
        check_options(verify, details, engine)  # before any work
        if verify:
            needs_paths(self.policy)
        stream = self.stream(
            rule,
            path,
            max_candidates=max_candidates,
            max_anchors=max_anchors,
            limit=limit,
            count_only=count_only,
            externals=externals,
            workers=workers,
            progress=progress,
        )
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
        workers: int = 0,
        progress: Progress | None = None,
    ) -> SearchStream:
        """`search` without verification, one rule result at a time (memory stays flat whatever the
        number of candidates). `limit` lists at most that many candidates per rule, `count_only` none;
        the counts are always complete."""
        from sspry.query.search import stream_forest

        source, compile_ms = load_for_search(rule, path, (progress or SILENT).note, externals)
        forest = self._forest()
        with self._lock:
            if self._plan_cache is None:
                self._plan_cache = PlanCache(forest.plan_cache_dir)
        stream = stream_forest(
            forest,
            source,
            max_candidates,
            max_anchors,
            workers,
            progress or SILENT,
            None,
            limit,
            count_only,
            self._plan_cache,
        )
        stream.timings_ms["compile"] = compile_ms
        return stream

    def delete(self, values: list[str] | tuple[str, ...]) -> list[Deletion]:
        """Delete by Source ID (hex), path, or file content (see sspry.deleting)."""
        return delete_values(ForestDeleter(self._forest(write=True)), list(values))

    def compact(self) -> CompactResult:
        """Rewrite every shard into one segment, dropping deleted documents."""
        return self._forest(write=True).compact(full=True)

    def info(self) -> dict:
        """Statistics and policy (what `sspry local info` prints)."""
        return self._forest().info()

    def check(
        self,
        rule: RuleText | None = None,
        path: RulePaths | None = None,
        *,
        max_anchors: int = DEFAULT_MAX_ANCHORS,
        externals: Externals | None = None,
    ) -> list[RuleReport]:
        """How each rule would be searched on this Forest (`sspry rule-check --root`)."""
        return check_rules(self.policy, max_anchors, rule=rule, path=path, externals=externals)
