#!/usr/bin/env python3
"""Recall audit: every file YARA matches must be a candidate.

Builds (or reuses) a forest from a corpus, scans the corpus once with every rule file (each in its own
namespace) for the ground truth -- with yara-python, yara-x, or both (a match of either is a true match;
files yara-x refuses are judged by yara-python alone) -- searches each rule file, and reports per rule
the true matches, candidates, false negatives and false positives. External variables (-d NAME=VALUE)
are given to both engines and to the planner. Exits 1 if any false negative is found.

  scripts/recall_audit.py --corpus DIR [DIR ...] --rules DIR [DIR ...] [-d NAME=VALUE ...]
                          [--engine yara|yara-x|both] [--root DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import yara
from tqdm import tqdm

from sspry.engines import compile_files, compile_x_files
from sspry.features.walk import walk
from sspry.indexing import index_paths
from sspry.policy import Policy
from sspry.query.externals import parse_defines
from sspry.query.rules import RuleError, load_rules
from sspry.query.ruleset import iter_source_plans
from sspry.query.search import search_snapshot
from sspry.store.forest import Forest, is_forest


def rule_files(directory: str) -> list[str]:
    found = [str(p) for p in Path(directory).rglob("*") if p.suffix in (".yar", ".yara") and p.is_file()]
    return sorted(found)


def compile_all(paths: list[str], externals: dict) -> tuple[yara.Rules, dict[str, str], dict[str, str]]:
    """One yara.Rules with every compilable file in its own namespace; returns (rules, ns->path, errors)."""
    good, errors = {}, {}
    for index, path in enumerate(paths):
        try:
            yara.compile(filepath=path, externals=externals)
            good[f"f{index}"] = path
        except yara.Error as exc:
            errors[path] = str(exc)
    return yara.compile(filepaths=good, externals=externals), good, errors


def yara_truth(rules: yara.Rules, files: list[str], workers: int) -> tuple[dict, list[str]]:
    """(namespace, rule) -> set of sha256 of the files yara-python matches, and the files it failed on."""
    truth: dict[tuple[str, str], set[bytes]] = {}
    failed: list[str] = []

    def scan(path: str):
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).digest()
        try:
            # fast mode: the same rules match (see engines.scan_group), without every match of a string
            return path, digest, rules.match(data=data, timeout=120, fast=True), None
        except yara.Error as exc:
            return path, digest, [], str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, digest, matches, error in tqdm(
            pool.map(scan, files), total=len(files), desc="yara-python ground truth", file=sys.stderr
        ):
            if error:
                failed.append(f"{path}: {error}")
            for match in matches:
                truth.setdefault((match.namespace, match.rule), set()).add(digest)
    return truth, failed


def yara_x_truth(
    namespaces: dict[str, str], files: list[str], externals: dict, workers: int
) -> tuple[dict, dict, list]:
    """The same with yara-x: every rule file it compiles alone, in its own namespace of one compiled set
    (includes relative to each file); returns (truth, refused rule files -> why, files it failed on).
    Worker processes: yara-x's binding holds the GIL."""
    accepted, refused = {}, {}
    for namespace, path in namespaces.items():
        try:
            compile_files("yara-x", {"default": path}, externals)
            accepted[namespace] = path
        except Exception as exc:  # EngineError: yara-x refuses what yara-python compiled
            refused[path] = str(exc)
    truth: dict[tuple[str, str], set[bytes]] = {}
    failed: list[str] = []
    with ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _x_worker, (accepted, externals)
    ) as pool:
        for path, digest, matches, error in tqdm(
            pool.map(_x_scan, files, chunksize=8),
            total=len(files),
            desc="yara-x ground truth",
            file=sys.stderr,
        ):
            if error:
                failed.append(f"{path}: yara-x: {error}")
            for key in matches:
                truth.setdefault(key, set()).add(digest)
    return truth, refused, failed


_X: dict = {}


def _x_worker(accepted: dict[str, str], externals: dict) -> None:
    import yara_x

    _X["scanner"] = yara_x.Scanner(compile_x_files(accepted, externals).rules)
    _X["scanner"].set_timeout(120)


def _x_scan(path: str):
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).digest()
    try:
        found = _X["scanner"].scan(data).matching_rules
        return path, digest, [(m.namespace, m.identifier) for m in found], None
    except Exception as exc:  # yara_x.ScanError, TimeoutError
        return path, digest, [], str(exc)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", nargs="+", required=True, help="files or directories to index and scan")
    parser.add_argument(
        "--rules", nargs="+", required=True, help="directories of rule files (.yar/.yara, recursive)"
    )
    parser.add_argument(
        "-d", "--define", action="append", default=[], help="NAME=VALUE: an external variable"
    )
    parser.add_argument(
        "--engine", choices=("yara", "yara-x", "both"), default="yara", help="ground truth by"
    )
    parser.add_argument("--root", help="forest root (reused if it exists; default: a temporary directory)")
    parser.add_argument("--json", dest="json_out", help="write the per-rule report here")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--gram-sizes", default="3,4")
    args = parser.parse_args()

    scratch = None
    root = args.root
    if root is None:
        scratch = tempfile.TemporaryDirectory(prefix="sspry-audit-")
        root = os.path.join(scratch.name, "forest")
    if not is_forest(Path(root)):
        pair = tuple(int(x) for x in args.gram_sizes.split(","))
        Forest.init(Path(root), Policy(store_path=True, gram_sizes=pair))
        with Forest.open(root, writable=True) as forest:
            started = time.perf_counter()
            summary = index_paths(forest, args.corpus, workers=args.workers)
            print(
                f"indexed {summary.inserted_documents} documents in {time.perf_counter() - started:.1f}s",
                file=sys.stderr,
            )

    files = walk(args.corpus).paths
    externals = parse_defines(args.define)
    paths = [path for directory in args.rules for path in rule_files(directory)]
    compiled, namespaces, compile_errors = compile_all(paths, externals)
    truth: dict[tuple[str, str], set[bytes]] = {}
    scan_failures: list[str] = []
    refused_by_x: dict[str, str] = {}
    if args.engine in ("yara", "both"):
        truth, scan_failures = yara_truth(compiled, files, args.workers)
    if args.engine in ("yara-x", "both"):
        x_truth, refused_by_x, x_failures = yara_x_truth(namespaces, files, externals, args.workers)
        scan_failures += x_failures
        for key, found in x_truth.items():
            truth.setdefault(key, set()).update(found)

    rows = []
    plan_failures = {}
    search_ms = []
    all_plans = []
    per_file_candidates: dict[tuple[str, str], set[bytes]] = {}
    with Forest.open(root) as forest:
        snapshot = forest.snapshot()
        documents = snapshot.documents
        for namespace, path in tqdm(sorted(namespaces.items()), desc="searching", file=sys.stderr):
            try:
                started = time.perf_counter()
                source = load_rules(path=path, externals=externals)
                plans = list(iter_source_plans(source, forest.policy))
                result = search_snapshot(snapshot, plans, forest.policy)
                search_ms.append((time.perf_counter() - started) * 1000)
            except RuleError as exc:
                plan_failures[path] = str(exc)
                continue
            all_plans.extend(plans)
            for rule in result.rules:
                per_file_candidates[(path, rule.name)] = {c.source_id for c in rule.candidates}
            for rule in result.rules:
                candidates = {c.source_id for c in rule.candidates}
                true = truth.get((namespace, rule.name), set())
                missed = true - candidates
                rows.append(
                    {
                        "file": os.path.relpath(path, os.path.commonpath(args.rules)),
                        "rule": rule.name,
                        "true_matches": len(true),
                        "candidates": len(candidates),
                        "false_negatives": len(missed),
                        "false_positives": len(candidates - true),
                        "unsearchable": len(candidates) == documents and documents > 0,
                        "missed": sorted(m.hex() for m in missed),
                    }
                )
        # Every plan of every file in one search: the bundle path (shared gram rows read once).
        started = time.perf_counter()
        bundle = search_snapshot(snapshot, all_plans, forest.policy)
        bundle_ms = (time.perf_counter() - started) * 1000
    bundle_sets = [{c.source_id for c in r.candidates} for r in bundle.rules]
    per_file_sets = [per_file_candidates[key] for key in per_file_candidates]
    bundle_consistent = bundle_sets == per_file_sets
    fn_rules = [r for r in rows if r["false_negatives"]]
    fp_share = [100.0 * r["false_positives"] / documents for r in rows] if documents else [0.0]
    fp_share.sort()
    report = {
        "documents": documents,
        "rule_files": len(paths),
        "rule_files_not_compiling": len(compile_errors),
        "ground_truth": args.engine,
        "rule_files_yara_x_refuses": len(refused_by_x),
        "rules": len(rows),
        "rules_with_matches": sum(1 for r in rows if r["true_matches"]),
        "true_match_pairs": sum(r["true_matches"] for r in rows),
        "false_negative_rules": len(fn_rules),
        "false_negatives": sum(r["false_negatives"] for r in rows),
        "unsearchable_rules": sum(1 for r in rows if r["unsearchable"]),
        "fp_percent_median": statistics.median(fp_share),
        "fp_percent_p90": fp_share[int(0.9 * (len(fp_share) - 1))],
        "search_ms_per_file_median": statistics.median(search_ms) if search_ms else 0.0,
        "search_ms_one_file_at_a_time_total": sum(search_ms),
        "bundle_ms_all_rules_at_once": bundle_ms,
        "bundle_equals_one_by_one": bundle_consistent,
        "yara_scan_failures": scan_failures,
        "plan_failures": plan_failures,
        "compile_errors": compile_errors,
        "yara_x_refused": refused_by_x,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": report, "rules": rows}, indent=1))
    for key, value in report.items():
        if not isinstance(value, dict | list):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    for row in fn_rules[:50]:
        missed = ", ".join(row["missed"][:3])
        print(f"FALSE NEGATIVE: {row['file']}:{row['rule']} missed {row['false_negatives']}: {missed}")
    if scratch is not None:
        scratch.cleanup()
    return 1 if fn_rules else 0


if __name__ == "__main__":
    sys.exit(main())
