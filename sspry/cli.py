"""The `sspry` command.

Exit codes: 0 success; 1 the operation ran but did not do everything asked (a value to delete was
missing); 2 bad input (invalid option value, rule file that does not compile, uninitialised forest).
Results go to stdout, progress and problems to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from sspry.policy import FP_RANGE, ID_SOURCES, Policy, PolicyError, parse_gram_sizes

DEFAULT_ROOT = "candidate_db"


class InputError(click.ClickException):
    """Bad input from the user: a clear message and exit status 2."""

    exit_code = 2


def _emit(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _open_forest(root: str, writable: bool):
    from sspry.store.forest import Forest, ForestError

    try:
        return Forest.open(root, writable=writable)
    except ForestError as exc:
        raise InputError(str(exc)) from exc
    except PolicyError as exc:
        raise InputError(f"{root}: {exc}") from exc


root_option = click.option(
    "--root",
    default=DEFAULT_ROOT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Forest root directory.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sspry")
def main() -> None:
    """sspry: a YARA prefilter database. Index files once; for any YARA rule, get back every file that
    could match (never missing one) in milliseconds, and let YARA verify only those."""


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
    type=click.IntRange(1),
    help="Documents per Tree before the next Tree opens.",
)
@click.option(
    "--ladder-steps",
    default=Policy.ladder_steps,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Bloom size classes per doubling of size (more: smaller database, more classes).",
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
max_anchors_option = click.option(
    "--max-anchors-per-pattern",
    default=16,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Grams read per literal and tier; more read costs I/O, fewer cost precision.",
)


# --- rule-check --------------------------------------------------------------------------------------
@main.command("rule-check")
@click.option("--rule", "rule", required=True, type=click.Path(dir_okay=False), help="YARA rule file.")
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
def rule_check(rule, as_json, root, gram_sizes, id_source, max_anchors_per_pattern):
    """Explain how each rule of RULE would be searched: status, grams per string, and what only
    verification decides (stable codes, with line and column). Exit 0 unless RULE does not compile."""
    from sspry.query.rulecheck import check_rule_file, file_status, format_text
    from sspry.query.rules import RuleError

    if root and (gram_sizes or id_source):
        raise click.UsageError("--root takes the policy from the Forest: drop --gram-sizes/--id-source")
    if root:
        with _open_forest(root, writable=False) as forest:
            policy, source = forest.policy, "local-root"
    else:
        policy = Policy(gram_sizes=gram_sizes or (3, 4), id_source=id_source or "sha256")
        source = "explicit" if (gram_sizes or id_source) else "defaults"
    try:
        reports = check_rule_file(rule, policy, max_anchors_per_pattern)
    except RuleError as exc:
        raise InputError(str(exc)) from exc
    if as_json:
        data = {
            "file": rule,
            "status": file_status(reports),
            "policy": {
                "source": source,
                "id_source": policy.id_source,
                "gram_sizes": list(policy.gram_sizes),
            },
            "rules": [r.to_json() for r in reports],
        }
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(format_text(rule, source, policy, reports))


# --- local -------------------------------------------------------------------------------------------
@main.group()
def local() -> None:
    """Work on a Forest in this process, without a server (the embedded mode)."""


@local.command("index")
@root_option
@click.argument("paths", nargs=-1, required=True)
@click.option("--path-list", is_flag=True, help="Each PATH is a file listing one path per line.")
@click.option("--workers", default=0, type=click.IntRange(0), help="Extraction threads (0: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def local_index(root, paths, path_list, workers, as_json):
    """Index files (directories are walked recursively) into the Forest at ROOT."""
    from sspry.indexing import index_paths

    with _open_forest(root, writable=True) as forest:
        summary = index_paths(forest, paths, path_list, workers)
    if summary.submitted_documents == 0 and summary.problems:
        raise InputError("no files could be indexed")
    counts = summary.counts()
    if as_json:
        _emit(counts)
    else:
        for key, value in counts.items():
            click.echo(f"{key}: {value}")


def _print_search(result, verify: bool) -> None:
    several = len(result.rules) > 1
    for number, rule in enumerate(result.rules):
        if several:
            if number:
                click.echo("")
            click.echo(f"rule: {rule.rule}")
        click.echo(f"candidates: {rule.candidate_count}")
        click.echo(f"truncated: {str(rule.truncated).lower()}")
        if rule.truncated:
            click.echo(f"truncated_limit: {rule.limit}")
        rows = rule.candidates
        if verify:
            matched = [c for c in rows if c.verified]
            skipped = [c for c in rows if c.verified is None]
            click.echo(f"verified_checked: {sum(1 for c in rows if c.verified is not None)}")
            click.echo(f"verified_matched: {len(matched)}")
            click.echo(f"verified_skipped: {len(skipped)}")
            rows = matched + skipped
        for candidate in rows:
            click.echo(candidate.source_id.hex())


@local.command("search")
@root_option
@click.option("--rule", "rule", required=True, type=click.Path(dir_okay=False), help="YARA rule file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@max_candidates_option
@click.option("--verify", is_flag=True, help="Scan candidates with YARA (needs a forest with --store-path).")
@max_anchors_option
@click.option("--search-workers", default=0, type=click.IntRange(0), help="Threads over segments (0: auto).")
def local_search(root, rule, as_json, max_candidates, verify, max_anchors_per_pattern, search_workers):
    """Return every indexed file that may match each public rule of RULE."""
    from sspry.query.rules import RuleError
    from sspry.query.search import search_rule_file
    from sspry.verify import verify as run_verify

    with _open_forest(root, writable=False) as forest:
        if verify and not forest.policy.store_path:
            raise InputError("--verify needs stored paths: this forest was initialised without --store-path")
        try:
            result, compiled = search_rule_file(
                forest, rule, max_candidates, max_anchors_per_pattern, search_workers
            )
        except RuleError as exc:
            raise InputError(str(exc)) from exc
        if verify:
            run_verify(result, compiled, forest.policy)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        _print_search(result, verify)


def _resolve_values(forest, values) -> list[tuple[str, list[bytes]]]:
    """Each VALUE as Source IDs: an existing file is hashed, hex of the right length is an ID, and with
    stored paths a path that no longer exists is looked up among them."""
    from sspry.features.extract import SkippedFile

    policy = forest.policy
    resolved = []
    for value in values:
        if os.path.isfile(value):
            hasher = policy.new_id_hasher()
            try:
                with open(value, "rb") as handle:
                    for block in iter(lambda h=handle: h.read(16 << 20), b""):
                        hasher.update(block)
            except OSError as exc:
                raise InputError(str(SkippedFile(value, exc.strerror or str(exc)))) from exc
            resolved.append((value, [hasher.digest()]))
            continue
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) == policy.id_bytes:
            resolved.append((value, [raw]))
        elif policy.store_path:
            resolved.append((value, forest.find_paths([os.path.realpath(value)])))
        else:
            raise InputError(
                f"{value!r} is neither an existing file nor a {policy.id_source} Source ID "
                f"({2 * policy.id_bytes} hex digits)"
            )
    return resolved


@local.command("delete")
@root_option
@click.argument("values", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def local_delete(root, values, as_json):
    """Delete documents by Source ID (hex) or by file path."""
    with _open_forest(root, writable=True) as forest:
        resolved = _resolve_values(forest, values)
        ids = [i for _, found in resolved for i in found]
        deleted = dict(zip(ids, forest.delete(ids), strict=True))
    rows = []
    for value, found in resolved:
        done = [i for i in found if deleted.get(i)]
        rows.append(
            {
                "value": value,
                "status": "deleted" if done else "missing",
                "identity": (done or found or [b""])[0].hex() or None,
            }
        )
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            click.echo(f"value: {row['value']}")
            click.echo(f"status: {row['status']}")
            click.echo(f"identity: {row['identity']}")
    if any(row["status"] != "deleted" for row in rows):
        sys.exit(1)


@local.command("compact")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def local_compact(root, as_json):
    """Rewrite every shard into one segment, dropping deleted documents."""
    with _open_forest(root, writable=True) as forest:
        result = forest.compact(full=True)
    summary = {
        "rewritten_segments": result.rewritten,
        "written_segments": result.written,
        "purged_documents": result.purged_docs,
    }
    if as_json:
        _emit(summary)
    else:
        for key, value in summary.items():
            click.echo(f"{key}: {value}")


@local.command("info")
@root_option
def local_info(root):
    """Print the Forest's statistics and policy as JSON."""
    with _open_forest(root, writable=False) as forest:
        _emit(forest.info())


if __name__ == "__main__":
    main()
