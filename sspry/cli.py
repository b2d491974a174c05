"""The `sspry` command.

Exit codes: 0 success; 1 the operation ran but did not do everything asked (a value to delete was
missing), or the forest could not be written (a full disk: what was acknowledged is kept, and the same
command completes once space is freed); 2 bad input (invalid option value, rule file that does not
compile, uninitialised forest); 130 interrupted (SIGINT/SIGTERM): what was done is kept and summarised.
Results go to stdout, progress and problems to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

from sspry.heap import keep_heap
from sspry.limits import MAX_TREE_DOCS
from sspry.policy import FP_RANGE, ID_SOURCES, Policy, PolicyError, parse_gram_sizes
from sspry.progress import Progress, Stage
from sspry.query.literals import DEFAULT_MAX_ANCHORS

DEFAULT_ROOT = "candidate_db"
ROOT_ENV = "SSPRY_ROOT"
INTERRUPTED = 130


class InputError(click.ClickException):
    """Bad input from the user: a clear message and exit status 2."""

    exit_code = 2


class WriteError(click.ClickException):
    """The forest could not be written (a full disk, an I/O error): one line, exit status 1."""

    exit_code = 1


def _emit(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _print_summary(summary: dict, as_json: bool) -> None:
    """A flat summary: JSON, or one `key: value` line per entry."""
    if as_json:
        _emit(summary)
    else:
        for key, value in summary.items():
            click.echo(f"{key}: {value}")


def _local(root: str):
    """The Database at ROOT, or a clear error (exit 2)."""
    from sspry.database import Database
    from sspry.store.forest import ForestError

    try:
        return Database.open(root)
    except ForestError as exc:
        raise InputError(str(exc)) from exc
    except PolicyError as exc:
        raise InputError(f"{root}: {exc}") from exc


class ServerError(click.ClickException):
    """A server refused or failed a call: exit status 1."""

    exit_code = 1


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    """What a Database or a Cluster raises, as one line: bad input (a rule YARA refuses, a request the
    policy forbids, a call a server refuses as invalid) exits 2; server trouble and a write the forest
    could not make (`Error: ...: No space left on device`) exit 1."""
    from sspry.client.connection import ClientError
    from sspry.engines import EngineError
    from sspry.query.rules import RuleError
    from sspry.store.errors import ForestError, StorageFull

    try:
        yield
    except (RuleError, PolicyError, EngineError) as exc:
        raise InputError(str(exc)) from exc
    except ClientError as exc:
        raise (InputError if exc.bad_input else ServerError)(str(exc)) from exc
    except StorageFull as exc:  # a write failed: nothing acknowledged is lost
        raise WriteError(str(exc)) from exc
    except ForestError as exc:  # locked, or of another format
        raise InputError(str(exc)) from exc
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise WriteError(f"{where}{exc.strerror or exc}") from exc


root_option = click.option(
    "--root",
    default=DEFAULT_ROOT,
    show_default=True,
    envvar=ROOT_ENV,
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Forest root directory.",
)


class _Bar(Stage):
    def __init__(self, bar):
        self.bar = bar

    def advance(self, amount: int = 1) -> None:
        self.bar.update(amount)

    def close(self) -> None:
        self.bar.close()


class TqdmProgress(Progress):
    """Progress bars on stderr (shown on a terminal, after half a second), notes always."""

    def stage(self, what: str, total: int | None, unit: str) -> Stage:
        from tqdm import tqdm

        byte_unit = unit == "B"
        return _Bar(
            tqdm(
                total=total,
                desc=what,
                unit=unit,
                unit_scale=byte_unit,
                unit_divisor=1024 if byte_unit else 1000,
                file=sys.stderr,
                disable=None,
                delay=0.5,
                leave=False,
            )
        )

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


@contextlib.contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the event once (the work stops taking new files and keeps what it has); a
    second signal exits at once (what was acknowledged is durable in the ingest log)."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            click.echo("interrupted again: exiting now", err=True)
            os._exit(INTERRUPTED)
        stop.set()
        click.echo(
            "interrupted: finishing the files being read and keeping what is indexed "
            "(interrupt again to exit at once)",
            err=True,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Sspry(click.Group):
    """`sspry --rule RULE... FILE...` (options first, no command) scans files directly with YARA, as the
    original did; an unknown command word is an error with a suggestion, never a file to scan."""

    def parse_args(self, ctx, args):
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["scan", *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=_Sspry,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Default scan mode: sspry --rule RULE FILE|DIR...  (YARA over the files, no database). "
    "Environment: SSPRY_ROOT (--root), SSPRY_ADDR (--addr), SSPRY_TOKEN (--token). "
    'Shell completion: eval "$(_SSPRY_COMPLETE=bash_source sspry)" (zsh_source, fish_source).',
)
@click.version_option(package_name="sspry")
def main() -> None:
    """sspry: a YARA prefilter database. Index files once; for any YARA rule, get back every file that
    could match (never missing one) in milliseconds, and let YARA verify only those."""
    # yara-python warns for each scan in which a string passed YARA's limit of matches; the rule's
    # verdict stands as YARA gives it, and over a corpus the warnings only bury the output
    warnings.filterwarnings("ignore", message="too many matches", category=RuntimeWarning)
    keep_heap()  # every YARA compilation would otherwise fault its 4 MB of heap back in (heap.py)


# --- init --------------------------------------------------------------------------------------------
def _fp(ctx, param, value: float) -> float:
    if not FP_RANGE[0] <= value <= FP_RANGE[1]:
        raise click.BadParameter(f"{value} is outside [{FP_RANGE[0]}, {FP_RANGE[1]}]")
    return value


def _gram_sizes(ctx, param, value: str) -> tuple[int, int]:
    try:
        return parse_gram_sizes(value)
    except PolicyError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@root_option
@click.option("--shards", default=8, show_default=True, type=click.IntRange(1, 256), help="Shards per Tree.")
@click.option(
    "--gram-sizes",
    default="3,4",
    show_default=True,
    callback=_gram_sizes,
    help="Tier 1 and Tier 2 gram sizes: 3,4 4,5 5,6 or 7,8.",
)
@click.option("--tier1-set-fp", default=0.4, show_default=True, callback=_fp, help="Tier 1 bloom fp.")
@click.option("--tier2-set-fp", default=0.25, show_default=True, callback=_fp, help="Tier 2 bloom fp.")
@click.option(
    "--id-source",
    default="sha256",
    show_default=True,
    type=click.Choice(list(ID_SOURCES)),
    help="Hash that identifies a file (its Source ID).",
)
@click.option("--store-path", is_flag=True, help="Store each file's path (needed for --verify).")
@click.option(
    "--tree-docs",
    default=Policy.tree_docs,
    show_default=True,
    type=click.IntRange(1, MAX_TREE_DOCS),
    help="Documents per Tree before the next Tree opens.",
)
@click.option(
    "--ladder-steps",
    default=Policy.ladder_steps,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Bloom size classes per doubling of size (more: smaller database, more classes).",
)
@click.option(
    "--fold-case/--no-fold-case",
    default=True,
    show_default=True,
    help="Tier 1 also indexes grams lowercased, so nocase strings prune as well as exact ones.",
)
@click.option("--force", is_flag=True, help="Delete an existing forest at ROOT and create a new one.")
def init(
    root,
    shards,
    gram_sizes,
    tier1_set_fp,
    tier2_set_fp,
    id_source,
    store_path,
    tree_docs,
    ladder_steps,
    fold_case,
    force,
):
    """Create a Forest and fix its policy. Every later command obeys it."""
    from sspry.store.forest import Forest, ForestError

    policy = Policy(
        id_source=id_source,
        gram_sizes=gram_sizes,
        tier1_fp=tier1_set_fp,
        tier2_fp=tier2_set_fp,
        store_path=store_path,
        shards=shards,
        tree_docs=tree_docs,
        ladder_steps=ladder_steps,
        fold_case=fold_case,
    )
    try:
        Forest.init(Path(root), policy, force=force)
    except (PolicyError, ForestError, OSError) as exc:
        raise InputError(str(exc)) from exc
    click.echo(f"Initialized sspry forest at {root}")
    for key, value in policy.describe().items():
        click.echo(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")


max_candidates_option = click.option(
    "--max-candidates",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 100),
    help="Cap each rule's candidates at this percent of live documents (0: no cap). Truncation is reported.",
)


def _defines(ctx, param, values: tuple[str, ...]) -> dict:
    from sspry.query.externals import ExternalError, parse_defines

    try:
        return parse_defines(values)
    except ExternalError as exc:
        raise click.BadParameter(str(exc)) from exc


rule_option = click.option(
    "--rule",
    "rule",
    required=True,
    multiple=True,
    type=click.Path(),
    metavar="FILE|DIR",
    help="A YARA rule file, or a directory of them (.yar/.yara, recursively); repeatable. Each file is "
    "compiled in a namespace of its own (NS:FILE names it); with several, rules are named ns:rule.",
)
define_option = click.option(
    "-d",
    "--define",
    "externals",
    multiple=True,
    callback=_defines,
    metavar="NAME=VALUE",
    help="An external variable, as yara -d takes it (true/false, integer, float, else string); repeatable. "
    "The planner uses its value.  [default: none]",
)
max_anchors_option = click.option(
    "--max-anchors-per-pattern",
    default=DEFAULT_MAX_ANCHORS,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Grams read per literal and tier; more read costs I/O, fewer cost precision.",
)


# --- rule-check --------------------------------------------------------------------------------------
@main.command("rule-check")
@rule_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--root", default=None, type=click.Path(file_okay=False), help="Take the policy from this Forest."
)
@click.option(
    "--gram-sizes",
    default=None,
    callback=lambda c, p, v: v and _gram_sizes(c, p, v),
    help="Assume these gram sizes (default 3,4).",
)
@click.option(
    "--id-source", default=None, type=click.Choice(list(ID_SOURCES)), help="Assume this Source ID hash."
)
@max_anchors_option
@define_option
@click.option("--only-problems", is_flag=True, help="Show only rules that are not fully searchable.")
@click.option(
    "--fail-on",
    type=click.Choice(["unsearchable", "searchable-needs-verify"]),
    default=None,
    help="Exit 1 when a public rule has this status or a worse one (for CI).  [default: never]",
)
def rule_check(
    rule, as_json, root, gram_sizes, id_source, max_anchors_per_pattern, externals, only_problems, fail_on
):
    """Explain how each rule of the rule files would be searched: status, each string with its grams, and what
    only verification decides (stable codes with line and column, why, and a hint), with counts by
    status. Exit 2 if a rule file does not compile; 1 with --fail-on when a rule has that status; else 0."""
    from sspry.query.rulecheck import check_rule_file, fails, file_status, format_text, status_counts
    from sspry.query.rules import RuleError

    if root and (gram_sizes or id_source):
        raise click.UsageError("--root takes the policy from the Forest: drop --gram-sizes/--id-source")
    if root:
        with _local(root) as db:
            policy, source = db.policy, "local-root"
    else:
        policy = Policy(gram_sizes=gram_sizes or (3, 4), id_source=id_source or "sha256")
        source = "explicit" if (gram_sizes or id_source) else "defaults"
    try:
        reports = check_rule_file(list(rule), policy, max_anchors_per_pattern, externals)
    except RuleError as exc:
        raise InputError(str(exc)) from exc
    if as_json:
        data = {
            "files": list(rule),
            "status": file_status(reports),
            "policy": {
                "source": source,
                "id_source": policy.id_source,
                "gram_sizes": list(policy.gram_sizes),
            },
            "counts": status_counts(reports),
            "rules": [r.to_json() for r in reports if r.has_problems or not only_problems],
        }
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(format_text(source, policy, reports, only_problems))
    if fail_on and fails(reports, fail_on):
        sys.exit(1)


# --- local -------------------------------------------------------------------------------------------
@main.group()
def local() -> None:
    """Work on a Forest in this process, without a server (the embedded mode)."""


workers_option = click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Extraction threads (0: one per core).",
)


def _print_index(summary) -> None:
    """Plain `key: value` lines; exit 130 when the run was interrupted."""
    for key, value in summary.counts().items():
        if key == "servers":
            for addr, counts in value.items():
                click.echo(f"server: {addr} " + " ".join(f"{k}={v}" for k, v in counts.items()))
        elif isinstance(value, bool):
            click.echo(f"{key}: {str(value).lower()}")
        elif isinstance(value, list):
            click.echo(f"{key}: {', '.join(value)}")
        else:
            click.echo(f"{key}: {value}")


def _finish_index(summary, as_json: bool) -> None:
    if summary.submitted_documents == 0 and summary.already_indexed_files == 0 and summary.problems:
        raise InputError("no files could be indexed")
    if as_json:
        _emit(summary.counts())
    else:
        _print_index(summary)
    if summary.interrupted:
        sys.exit(INTERRUPTED)


@local.command("index")
@root_option
@click.argument("paths", nargs=-1, required=True)
@click.option("--path-list", is_flag=True, help="Each PATH is a file listing one path per line.")
@workers_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def local_index(root, paths, path_list, workers, as_json):
    """Index files (directories are walked recursively) into the Forest at ROOT. Files indexed before
    and unchanged since (same path, size and mtime) are not read again. Interrupting keeps what was
    indexed, prints the summary so far and exits 130."""
    with _local(root) as db:
        _index(db, paths, path_list, workers, as_json)


def _index(store, paths, path_list: bool, workers: int, as_json: bool, **options) -> None:
    """`local index` and `index`: one run over a Database or a Cluster."""
    with _failures(), _interruptible() as stop:
        summary = store.index(
            paths, path_list=path_list, workers=workers, progress=TqdmProgress(), stop=stop, **options
        )
    _finish_index(summary, as_json)


def _print_deleted(rows: list, as_json: bool) -> None:
    """Per value: status, identity, and why (exit 1 unless every value was deleted or path-removed)."""
    if as_json:
        click.echo(json.dumps([row.to_json() for row in rows]))
    else:
        for row in rows:
            click.echo(f"value: {row.value}")
            click.echo(f"status: {row.status}")
            click.echo(f"identity: {row.identity or ''}")
            if row.remaining_paths is not None:
                click.echo(f"remaining_paths: {row.remaining_paths}")
            if row.servers:
                click.echo(f"server: {', '.join(row.servers)}")
            if row.reason:
                click.echo(f"reason: {row.reason}")
    if any(row.status == "missing" for row in rows):
        sys.exit(1)


def _print_rule(rule, number: int, several: bool, verify: bool) -> None:
    """One rule, plain: counts, then a line per candidate: Source ID, with --verify its outcome, and its
    paths, tab separated (matches first when verified), then the match details asked for, indented."""
    if several:
        if number:
            click.echo("")
        click.echo(f"rule: {rule.name}")
    click.echo(f"candidates: {rule.candidate_count}")
    click.echo(f"truncated: {str(rule.truncated).lower()}")
    if rule.truncated:
        click.echo(f"truncated_limit: {rule.limit}")
    rows = rule.candidates
    if verify:
        for key, value in rule.verified_counts().items():
            click.echo(f"{key}: {value}")
        order = {"match": 0, "no-match": 2}
        rows = sorted(rows, key=lambda c: order.get(c.outcome, 1))
    for candidate in rows:
        fields = [candidate.source_id.hex()]
        if verify:
            fields.append(candidate.outcome)
        fields.extend(candidate.paths)
        if candidate.path_count > len(candidate.paths):
            fields.append(f"(+{candidate.path_count - len(candidate.paths)} more paths)")
        click.echo("\t".join(fields))
        _print_details(candidate.details or {})


def _print_details(details: dict, indent: str = "\t") -> None:
    """Tags, meta and matched strings of one match (verify.match_details), a line each."""
    if "tags" in details:
        click.echo(f"{indent}tags: {','.join(details['tags'])}")
    for key, value in details.get("meta", {}).items():
        click.echo(f"{indent}meta: {key}={json.dumps(value)}")
    for found in details.get("matches", []):
        click.echo(f"{indent}0x{found['offset']:x}:{found['identifier']}: {found['data']}")
    if details.get("matches_truncated"):
        click.echo(f"{indent}(more string matches not shown)")


def _search(
    store,
    rule: str,
    output: str,
    max_candidates: float,
    verify: bool,
    max_anchors_per_pattern: int,
    limit: int | None,
    count: bool,
    details: tuple[str, ...],
    engine: str,
    externals: dict,
    **options,
) -> None:
    """`local search` and `search` (their options by name): one search over a Database or a Cluster,
    printed rule by rule as the results come (all at once with --verify, which scans every candidate
    first). `output` is "plain", "json" (one object, written incrementally) or "ndjson" (a line per rule,
    then a summary line). `options` go to the store as they are (`workers` for a Database)."""
    if verify and count:
        raise click.UsageError("--count lists no candidates to verify: drop one of them")
    if details and not verify:
        raise click.UsageError(
            "--print-strings/--print-tags/--print-meta show what --verify found: add --verify"
        )
    started = time.perf_counter()
    asked = dict(
        max_candidates=max_candidates,
        max_anchors=max_anchors_per_pattern,
        limit=limit,
        externals=externals,
        progress=TqdmProgress(),
    )
    with _failures():
        if verify:
            found = store.search(
                path=list(rule), verify=True, details=details, engine=engine, **asked, **options
            )
            rules, names, summary = found.rules, [r.name for r in found.rules], found
        else:
            found = store.stream(path=list(rule), count_only=count, **asked, **options)
            rules, names, summary = found, found.targets, found
        several = len(names) > 1
        if output == "json":
            click.echo('{"rules": [', nl=False)
        for number, result in enumerate(rules):
            if output == "plain":
                _print_rule(result, number, several, verify)
            else:
                separator = "," if number and output == "json" else ""
                click.echo(separator + json.dumps(result.to_json()), nl=output == "ndjson")
    summary.timings_ms["total"] = (time.perf_counter() - started) * 1000
    end = summary.summary_json()
    if output == "json":
        click.echo("], " + json.dumps(end)[1:])
    elif output == "ndjson":
        click.echo(json.dumps({"summary": end}))
    if verify:
        skipped = {c.source_id: c for r in found.rules for c in r.candidates if c.skipped}
        for candidate in skipped.values():
            click.echo(f"not verified: {candidate.source_id.hex()}: {candidate.skip_detail}", err=True)


def _output_options(function):
    """--json / --ndjson, --count, --limit: how a search's results are written."""
    options = [
        click.option(
            "--json", "output", flag_value="json", help="Print one JSON object (written as it goes)."
        ),
        click.option(
            "--ndjson",
            "output",
            flag_value="ndjson",
            help="Print a JSON line per rule as each is ready, then a summary line.",
        ),
        click.option("--plain", "output", flag_value="plain", default=True, help="Print text (the default)."),
        click.option("--count", is_flag=True, help="Only count each rule's candidates (no list)."),
        click.option(
            "--limit",
            type=click.IntRange(1),
            default=None,
            help="List at most N candidates per rule (counts stay complete).  [default: all]",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


engine_option = click.option(
    "--engine",
    type=click.Choice(["yara", "yara-x"]),
    default="yara",
    show_default=True,
    help="What scans files: yara-python (libyara) or yara-x; for search, with --verify.",
)


def _details_options(function):
    """--print-strings / --print-tags / --print-meta: what to show of each verified match."""
    for flag, value, what in reversed(
        (
            ("--print-strings", "strings", "the matched strings: identifier, offset and up to 64 bytes"),
            ("--print-tags", "tags", "the rule's tags"),
            ("--print-meta", "meta", "the rule's meta"),
        )
    ):
        function = click.option(
            flag,
            "details",
            flag_value=value,
            multiple=True,
            help=f"With --verify: print {what} of each match.",
        )(function)
    return function


search_workers_option = click.option(
    "--search-workers",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Threads over segments (0: up to 4, one per core).",
)


@local.command("search")
@root_option
@rule_option
@_output_options
@max_candidates_option
@click.option("--verify", is_flag=True, help="Scan candidates with YARA (needs a forest with --store-path).")
@_details_options
@engine_option
@max_anchors_option
@define_option
@search_workers_option
def local_search(root, search_workers, **options):
    """Return every indexed file that may match each public rule of the rule files."""
    with _local(root) as db:
        _search(db, workers=search_workers, **options)


@local.command("delete")
@root_option
@click.argument("values", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def local_delete(root, values, as_json):
    """Delete by VALUE: a hex Source ID deletes its document; a path forgets that file, and deletes its
    document when no other path of the same content is recorded; an unrecorded existing file deletes the
    document with its content. Exit 1 if a value matched nothing."""
    with _local(root) as db:
        _delete(db, values, as_json)


def _delete(store, values, as_json: bool) -> None:
    """`local delete` and `delete`."""
    with _failures():
        rows = store.delete(list(values))
    _print_deleted(rows, as_json)


@local.command("compact")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def local_compact(root, as_json):
    """Rewrite every shard into one segment, dropping deleted documents."""
    with _local(root) as db, _failures():
        result = db.compact()
    summary = {
        "rewritten_segments": result.rewritten,
        "written_segments": result.written,
        "purged_documents": result.purged_docs,
    }
    _print_summary(summary, as_json)


@local.command("backup")
@root_option
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--copy", "copy_files", is_flag=True, help="Copy segments even where hard links would do.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def local_backup(root, dest, copy_files, as_json):
    """Copy the Forest at ROOT into DEST (new or empty) consistently, while a server or an index may be
    writing it: the policy, the unpublished logs, the catalog (SQLite's backup), then one manifest and the
    immutable segments it names (hard links on the same filesystem, else copies), the manifest last.
    DEST is a forest of its own."""
    from sspry.store.backup import backup
    from sspry.store.forest import is_forest

    if not is_forest(Path(root)):
        raise InputError(f"{root} is not an initialised sspry forest")
    if Path(dest).exists() and any(Path(dest).iterdir()):
        raise InputError(f"{dest} exists and is not empty: back up into a new or empty directory")
    with _failures():
        result = backup(Path(root), Path(dest), link=not copy_files)
    summary = {
        "generation": result.generation,
        "documents": result.documents,
        "segments": result.segments,
        "unpublished_logs": result.logs,
        "linked_files": result.linked_files,
        "copied_bytes": result.copied_bytes,
    }
    _print_summary(summary, as_json)


@local.command("info")
@root_option
def local_info(root):
    """Print the Forest's statistics and policy as JSON."""
    with _local(root) as db:
        _emit(db.info())


# --- server and remote client ------------------------------------------------------------------------
def _client_options(function):
    """--addr, --timeout, --max-message-bytes, --ignore-offline, --token, --tls-ca."""
    options = [
        click.option(
            "--addr",
            default=None,
            envvar="SSPRY_ADDR",
            show_envvar=True,
            help="Server address(es), comma separated  [default: 127.0.0.1:17653]",
        ),
        click.option(
            "--timeout",
            default=30.0,
            show_default=True,
            type=click.FloatRange(0.1),
            help="Seconds per call (searches: per silence, then a health check).",
        ),
        click.option(
            "--max-message-bytes",
            default=64 << 20,
            show_default=True,
            type=click.IntRange(1 << 16),
            help="Largest gRPC message sent or received (larger rows are sent in pieces).",
        ),
        click.option(
            "--ignore-offline",
            is_flag=True,
            help="Go on without servers that cannot be reached (named on stderr and in --json).",
        ),
        click.option(
            "--token",
            envvar="SSPRY_TOKEN",
            show_envvar=True,
            default=None,
            help="Shared token of the servers.",
        ),
        click.option(
            "--tls-ca", type=click.Path(dir_okay=False, exists=True), help="CA certificate (PEM) for TLS."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca):
    """The servers named by --addr, as one Cluster (`sspry.connect`)."""
    from sspry.client.cluster import connect

    try:
        return connect(
            addr,
            token=token,
            tls_ca=tls_ca,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            ignore_offline=ignore_offline,
            progress=TqdmProgress(),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from exc


@main.command()
@root_option
@click.option(
    "--addr",
    default=None,
    envvar="SSPRY_ADDR",
    show_envvar=True,
    help="Listen address HOST:PORT (port 0: pick a free one, printed)  [default: 127.0.0.1:17653]",
)
@search_workers_option
@click.option(
    "--max-message-bytes",
    default=64 << 20,
    show_default=True,
    type=click.IntRange(1 << 16),
    help="Largest gRPC message sent or received.",
)
@click.option(
    "--token", envvar="SSPRY_TOKEN", show_envvar=True, default=None, help="Require this token on every call."
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="TLS private key (PEM).")
@click.option(
    "--max-searches",
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Searches evaluated at once; more wait for a turn.",
)
@click.option(
    "--insert-budget-bytes",
    default=1 << 30,
    show_default=True,
    type=click.IntRange(1 << 20),
    help="Bytes of all insert calls in flight together; a call beyond it is refused (clients retry).",
)
@click.option(
    "--idle-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds an insert stream may send nothing before it is ended.",
)
@click.option(
    "--settle-after",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds without inserts after which each shard's segments are merged into one, a shard at a "
    "time (searches visit fewer segments); 0: never.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="What the server logs on stderr (info: every publish and search).",
)
def serve(
    root,
    addr,
    search_workers,
    max_message_bytes,
    token,
    tls_cert,
    tls_key,
    max_searches,
    insert_budget_bytes,
    idle_timeout,
    settle_after,
    log_level,
):
    """Serve the Forest at ROOT over gRPC until SIGINT/SIGTERM or `sspry shutdown`."""
    import logging

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    from sspry.client.connection import parse_addrs
    from sspry.server.app import ServeError
    from sspry.server.app import serve as run
    from sspry.server.service import Limits
    from sspry.store.forest import ForestError

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        addrs = parse_addrs(addr, listen=True)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if len(addrs) > 1:
        raise InputError(f"a server listens on one address, not {len(addrs)}: {', '.join(addrs)}")
    (listen,) = addrs
    try:
        run(
            Path(root),
            listen,
            token=token,
            tls_cert=Path(tls_cert) if tls_cert else None,
            tls_key=Path(tls_key) if tls_key else None,
            max_message_bytes=max_message_bytes,
            search_workers=search_workers,
            limits=Limits(
                max_call_bytes=min(1 << 30, insert_budget_bytes),
                insert_budget_bytes=insert_budget_bytes,
                idle_timeout_s=idle_timeout,
                searches=max_searches,
            ),
            settle_after_s=settle_after,
        )
    except (ForestError, ServeError) as exc:
        raise InputError(str(exc)) from exc
    except PolicyError as exc:
        raise InputError(f"{root}: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot serve {root}: {exc}") from exc


@main.command()
@click.argument("paths", nargs=-1, required=True)
@_client_options
@click.option("--path-list", is_flag=True, help="Each PATH is a file listing one path per line.")
@workers_option
@click.option(
    "--batch-bytes",
    default=32 << 20,
    show_default=True,
    type=click.IntRange(1 << 16),
    help="Bloom bytes sent per insert call (a batch also ends at 256 documents).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def index(
    paths,
    addr,
    timeout,
    max_message_bytes,
    ignore_offline,
    token,
    tls_ca,
    path_list,
    workers,
    batch_bytes,
    as_json,
):
    """Index files on server(s): extracted here, each batch's new documents sent to the server with the
    fewest documents, published when the command returns. Files indexed before and unchanged since are
    not read again. Interrupting keeps what was sent, prints the summary so far and exits 130."""
    with _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca) as cluster:
        _index(cluster, paths, path_list, workers, as_json, batch_bytes=batch_bytes)


@main.command()
@rule_option
@_client_options
@_output_options
@max_candidates_option
@click.option(
    "--verify", is_flag=True, help="Scan candidates with YARA here (the stored paths must be readable)."
)
@_details_options
@engine_option
@max_anchors_option
@define_option
def search(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca, **options):
    """Search server(s) with every public rule of the rule files; results merged, deduplicated, then
    capped."""
    with _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca) as cluster:
        _search(cluster, **options)


@main.command()
@click.argument("values", nargs=-1, required=True)
@_client_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def delete(values, addr, timeout, max_message_bytes, ignore_offline, token, tls_ca, as_json):
    """Delete on every server by VALUE, as `local delete` does (Source ID, path, or file content)."""
    with _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca) as cluster:
        _delete(cluster, values, as_json)


@main.command()
@_client_options
def info(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca):
    """Print each server's statistics and policy as JSON (an array when several)."""
    with _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca) as cluster:
        with _failures():
            found = cluster.info()
        several = len(cluster.addrs) > 1
    if several:
        click.echo(json.dumps(found, indent=2))
    else:
        _emit(found[0])


@main.command()
@_client_options
def shutdown(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca):
    """Ask server(s) to finish the calls in flight and exit."""
    with _cluster(addr, timeout, max_message_bytes, ignore_offline, token, tls_ca) as cluster:
        with _failures():
            answers = cluster.shutdown()
        for server, message in answers:
            click.echo(f"{server}: {message}")


@main.command(hidden=True)
@rule_option
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--scan-timeout", default=60, show_default=True, type=click.IntRange(1), help="Seconds per file."
)
@click.option("--show-tags", is_flag=True, help="Print the tags of matching rules (as --print-tags).")
@_details_options
@engine_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file (JSON lines).")
@define_option
def scan(rule, files, scan_timeout, show_tags, details, engine, as_json, externals):
    """Scan FILES directly with YARA (the default mode: `sspry --rule RULE FILE|DIR...`). Directories
    are walked recursively; FIFOs, devices and sockets are passed over. Exit 1 if a file could not be
    scanned."""
    from sspry.engines import compile_files, scan_errors, scan_group
    from sspry.features.walk import walk
    from sspry.query.rules import rule_specs

    if show_tags:
        details = (*details, "tags")
    with _failures():
        specs = rule_specs(path=list(rule))
        compiled = compile_files(engine, {spec.namespace: spec.path for spec in specs}, externals)
    rule = ", ".join(rule)
    found = walk(files)
    for problem in found.problems:
        click.echo(f"skipped: {problem}", err=True)
    failed = bool(found.problems)
    asked = {*details, "tags"}  # JSON rows always carry the tags
    for path in found.paths:
        try:
            matches = scan_group(compiled, path, None, asked, externals, scan_timeout)
            error = None
        except scan_errors() as exc:
            matches, error, failed = {}, str(exc), True
        if as_json:
            row = {"file": path, "rule_file": rule, "matched": bool(matches)}
            row["matches"] = [{"rule": name, **found} for name, found in matches.items()]
            if error:
                row["error"] = error
            click.echo(json.dumps(row))
            continue
        click.echo(f"file: {path}")
        click.echo(f"rule: {rule}")
        if error:
            click.echo(f"error: {error}")
            continue
        click.echo(f"matched: {'yes' if matches else 'no'}")
        click.echo(f"match_count: {len(matches)}")
        for name, found in matches.items():
            click.echo(f"match_rule: {name}")
            tags = found.pop("tags")
            if "tags" in details:
                click.echo(f"match_tags: {','.join(tags)}")
            _print_details(found, indent="  ")
    if failed:
        sys.exit(1)


def _add_web() -> None:
    from sspry.web.command import web  # the page and REST API (web/); its heavy imports wait for use

    main.add_command(web)


_add_web()


if __name__ == "__main__":
    main()
