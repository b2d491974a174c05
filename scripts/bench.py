#!/usr/bin/env python3
"""One command for the numbers users judge a prefilter by, measured in one run.

  scripts/bench.py [--docs 10000] [--work bench-work] [--json OUT] [--skip-server]

Builds (or reuses) the synthetic corpus of scripts/gen_corpus.py, indexes it into a local forest and
through a `sspry serve` process, searches 100 single rules and bundles of 1, 10, 100 and 1,000 rules
(in-process and through the server), scans the corpus with yara-python using the same rules
(brute force, all cores), and prints one table: index MB/s and files/s, database size (% of the
corpus, and against the original's bloom sizing for the same documents), search latency p50/p95
(single rules), each bundle's first search (planned cold) and its repeats (plans from the forest's plan
cache, as `sspry local search` plans), bundle vs one by one, speedup over brute-force YARA (from the
first search), candidate precision, server RSS. The server's searches wait until it has settled
(merged each shard into one segment, as `sspry serve` does once inserts stop); single rules through
the server are timed as the client waits and as the server spends (from the request's arrival), then
once more on the server (it has their plans: a warm server's repeated rule). The
in-process forest is searched as indexed (no compaction). The corpus and both forests are reused by later
runs with the same --docs, and so are their index timings: delete WORK/docs-N/local or served to
index again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yara

from sspry.client.cluster import Cluster
from sspry.features.walk import walk
from sspry.indexing import IndexSummary, index_paths
from sspry.policy import Policy
from sspry.query.plancache import PlanCache
from sspry.query.search import search_rule_file
from sspry.store.forest import Forest, is_forest
from sspry.synthetic import SET_SIZES, benchmark_corpus
from sspry.verify import verify

CORES = len(os.sched_getaffinity(0))
SETTLE_AFTER_S = 2.0  # the served forest settles (shards merged) this long after the last insert
BUNDLE_RUNS = 5  # runs of each bundle below the largest: the first, then repeats for p50 and p95
LARGEST_RUNS = 2  # the largest bundle: its first search and one repeat


def original_sizing_bytes(estimates: np.ndarray, policy: Policy) -> int:
    """What the Rust original's sizing gives for these estimates (inventory 2.4): per tier
    ceil(-n ln p / ln2^2) bits, in bytes rounded to the nearest KiB (at least 1 KiB)."""
    total = 0
    for tier, fp in ((0, policy.tier1_fp), (1, policy.tier2_fp)):
        n = estimates[:, tier].astype(np.float64)
        bits = np.ceil(-n * math.log(fp) / math.log(2) ** 2)
        kib = np.maximum(1, np.round(np.ceil(bits / 8) / 1024))
        total += int((kib * 1024).sum())
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def brute_force(rules_path: Path, files: list[str]) -> tuple[float, dict[str, set[bytes]]]:
    rules = yara.compile(filepath=str(rules_path))

    def scan(path: str):
        data = Path(path).read_bytes()
        try:
            matched = rules.match(data=data, timeout=600)
        except yara.Error:
            matched = []
        return hashlib.sha256(data).digest(), [m.rule for m in matched]

    truth: dict[str, set[bytes]] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(CORES) as pool:
        for digest, names in pool.map(scan, files):
            for name in names:
                truth.setdefault(name, set()).add(digest)
    return time.perf_counter() - started, truth


def timed_index(run: Callable[[], IndexSummary], record: Path) -> dict:
    """Time one index run; its speed is also written to `record`, for later runs that reuse the forest."""
    started = time.perf_counter()
    summary = run()
    elapsed = time.perf_counter() - started
    speed = {
        "seconds": round(elapsed, 1),
        "mb_per_s": round(summary.input_bytes / 2**20 / elapsed, 1),
        "files_per_s": round(summary.submitted_documents / elapsed, 1),
    }
    record.write_text(json.dumps(speed))
    return speed


def settle(cluster: Cluster) -> dict:
    """Wait until the server has merged each shard into one segment, as a server does once inserts
    stop (`sspry serve --settle-after`): searches are timed on the settled forest."""
    started = time.perf_counter()
    before = cluster.info()[0]["segments"]
    while (info := cluster.info()[0])["segments"] > info["trees"] * info["shards"]:
        time.sleep(0.5)
    return {
        "segments_before": before,
        "segments": info["segments"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def status_kb(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, RssAnon, ...) in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--json", dest="json_out", type=Path)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    work = args.work / f"docs-{args.docs}"
    corpus_dir = work / "corpus"
    corpus = benchmark_corpus(corpus_dir, args.docs)
    files = walk([str(corpus_dir / "files")]).paths
    corpus_bytes = corpus["bytes"]
    rules_dir = corpus_dir / "rules"
    report: dict = {"docs": args.docs, "corpus_bytes": corpus_bytes, "cores": CORES}

    # --- index, in process ------------------------------------------------------------------------
    local = work / "local"
    if not is_forest(local):
        Forest.init(local, Policy(store_path=True))
        with Forest.open(local, writable=True) as forest:
            report["local_index"] = timed_index(
                lambda: index_paths(forest, [str(corpus_dir / "files")]),
                work / "local-index.json",
            )
    else:
        report["local_index"] = json.loads((work / "local-index.json").read_text())

    with Forest.open(local) as forest:
        info = forest.info()
        estimates = np.concatenate([v.reader.estimates[v.live] for v in forest.snapshot().views])
        original = original_sizing_bytes(estimates, forest.policy)
        report["database"] = {
            "documents": info["documents"],
            "segments": info["segments"],
            "disk_bytes": info["disk_bytes"],
            "bloom_bytes": info["bloom_bytes"],
            "percent_of_corpus": round(100 * info["disk_bytes"] / corpus_bytes, 2),
            "original_sizing_bytes": original,
            "blooms_vs_original_sizing": round(info["bloom_bytes"] / original, 3),
        }

        # --- searches, in process, with the compiled gather a server uses (see query/gather.py) ------
        singles = sorted((rules_dir / "single").glob("rule_*.yar"))
        search_rule_file(forest, str(singles[0]), compiled_gather=True)  # warm the maps and caches once
        latencies = []
        single_candidates = {}
        for path in singles:
            started = time.perf_counter()
            result, _ = search_rule_file(forest, str(path), compiled_gather=True)
            latencies.append((time.perf_counter() - started) * 1000)
            single_candidates[result.rules[0].name] = {c.source_id for c in result.rules[0].candidates}
        report["single_rule_ms"] = {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "rules": len(singles),
        }
        bundles = {}
        bundle_candidates = {}
        # bundles plan through the forest's plan cache, as `sspry local search` and the library do; it is
        # emptied first, so each bundle's first search plans cold and its repeats reuse the plans
        shutil.rmtree(forest.plan_cache_dir, ignore_errors=True)
        plan_cache = PlanCache(forest.plan_cache_dir)
        for size in SET_SIZES:
            path = rules_dir / f"rules_{size}.yar"
            runs = []
            for _ in range(BUNDLE_RUNS if size < max(SET_SIZES) else LARGEST_RUNS):
                started = time.perf_counter()
                result, source = search_rule_file(
                    forest, str(path), compiled_gather=True, plan_cache=plan_cache
                )
                runs.append(time.perf_counter() - started)
            bundles[size] = {
                "bundle_s": round(runs[0], 3),
                "repeated_s": round(statistics.median(runs[1:]), 3),
                "repeated_s_p95": round(percentile(runs[1:], 0.95), 3),
                "repeats": len(runs) - 1,
            }
            if size <= len(singles):
                bundles[size]["one_by_one_s"] = round(sum(latencies[:size]) / 1000, 3)
            if size == max(SET_SIZES):
                bundle_candidates = {r.name: {c.source_id for c in r.candidates} for r in result.rules}
                started = time.perf_counter()
                verify(result, source, forest.policy, workers=CORES)
                bundles[size]["verify_s"] = round(time.perf_counter() - started, 3)
        plan_cache.close()
        report["bundles"] = bundles

    # --- brute force --------------------------------------------------------------------------------
    largest = max(SET_SIZES)
    brute_s, truth = brute_force(rules_dir / f"rules_{largest}.yar", files)
    report["brute_force_yara_s"] = round(brute_s, 2)
    search_and_verify = bundles[largest]["bundle_s"] + bundles[largest]["verify_s"]
    report["speedup_over_yara"] = {
        "search_only": round(brute_s / bundles[largest]["bundle_s"], 1),
        "search_and_verify": round(brute_s / search_and_verify, 1),
    }
    missed = sum(len(truth.get(rule, set()) - found) for rule, found in bundle_candidates.items())
    candidates = sum(len(found) for found in bundle_candidates.values())
    true_pairs = sum(len(truth.get(rule, set())) for rule in bundle_candidates)
    shares = sorted(
        100 * len(found - truth.get(rule, set())) / max(1, args.docs)
        for rule, found in bundle_candidates.items()
    )
    report["precision"] = {
        "false_negatives": missed,
        "true_matches": true_pairs,
        "candidates": candidates,
        "true_share_of_candidates": round(true_pairs / max(1, candidates), 3),
        "fp_percent_of_docs_median": round(statistics.median(shares), 4),
        "fp_percent_of_docs_p90": round(percentile(shares, 0.9), 4),
    }

    # --- through a server -----------------------------------------------------------------------------
    if not args.skip_server:
        served = work / "served"
        fresh = not is_forest(served)
        if fresh:
            Forest.init(served, Policy(store_path=True))
        command = [
            "serve",
            "--root",
            str(served),
            "--addr",
            "127.0.0.1:0",
            "--settle-after",
            str(SETTLE_AFTER_S),
        ]
        server = subprocess.Popen(
            [sys.executable, "-m", "sspry", *command],
            stdout=subprocess.PIPE,
            text=True,
        )
        addr = server.stdout.readline().rsplit(" ", 1)[1].strip()
        try:
            with Cluster([addr], timeout=600) as cluster:
                if fresh:
                    report["server_index"] = timed_index(
                        lambda: cluster.index([str(corpus_dir / "files")]),
                        work / "server-index.json",
                    )
                else:
                    report["server_index"] = json.loads((work / "server-index.json").read_text())
                report["server_settle"] = settle(cluster)
                latencies, on_server, repeated = [], [], []
                for path in singles:  # what the client waits for, its rule compilation included
                    started = time.perf_counter()
                    found = cluster.search(path=str(path))
                    latencies.append((time.perf_counter() - started) * 1000)
                    on_server.append(found.timings_ms["plan"] + found.timings_ms["search"])
                for path in singles:  # the same rules again: the server has their plans
                    found = cluster.search(path=str(path))
                    repeated.append(found.timings_ms["plan"] + found.timings_ms["search"])
                server_bundles = {}
                for size in SET_SIZES:
                    started = time.perf_counter()
                    cluster.search(path=str(rules_dir / f"rules_{size}.yar"))
                    server_bundles[size] = round(time.perf_counter() - started, 3)
                report["server_search"] = {
                    "single_rule_ms_p50": round(statistics.median(latencies), 1),
                    "single_rule_ms_p95": round(percentile(latencies, 0.95), 1),
                    # from the request's arrival to the last frame: YARA's check, planning, evaluation
                    "single_rule_server_side_ms_p50": round(statistics.median(on_server), 1),
                    "single_rule_server_side_ms_p95": round(percentile(on_server, 0.95), 1),
                    "repeated_rule_server_side_ms_p50": round(statistics.median(repeated), 2),
                    "repeated_rule_server_side_ms_p95": round(percentile(repeated, 0.95), 2),
                    "bundle_s": server_bundles,
                    "server_rss_mb": round(status_kb(server.pid, "VmRSS") / 1024, 1),
                    "server_rss_anon_mb": round(status_kb(server.pid, "RssAnon") / 1024, 1),
                }
                cluster.shutdown()
        finally:
            server.wait(timeout=600)

    print_table(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


def print_table(report: dict) -> None:
    database = report["database"]
    rows = [
        ("documents", f"{report['docs']:,} ({report['corpus_bytes'] / 2**30:.2f} GiB)"),
        (
            "index, in process",
            f"{report['local_index']['mb_per_s']} MB/s, {report['local_index']['files_per_s']} files/s",
        ),
    ]
    if "server_index" in report:
        server = report["server_index"]
        rows.append(
            ("index, through the server", f"{server['mb_per_s']} MB/s, {server['files_per_s']} files/s")
        )
    rows += [
        (
            "database",
            f"{database['disk_bytes'] / 2**20:.0f} MiB = {database['percent_of_corpus']}% of the corpus",
        ),
        ("blooms vs original sizing", f"{database['blooms_vs_original_sizing']}x"),
        (
            "single rule p50 / p95",
            f"{report['single_rule_ms']['p50']} / {report['single_rule_ms']['p95']} ms",
        ),
    ]
    for size, row in report["bundles"].items():
        text = f"first {row['bundle_s']} s, repeated "
        if row["repeats"] > 1:
            text += f"p50 {row['repeated_s']} / p95 {row['repeated_s_p95']} s over {row['repeats']} runs"
        else:
            text += f"{row['repeated_s']} s"
        if "one_by_one_s" in row:
            text += f" (one by one: {row['one_by_one_s']} s)"
        rows.append((f"bundle of {size}", text))
    speed = report["speedup_over_yara"]
    rows.append(("brute-force YARA, 1,000 rules", f"{report['brute_force_yara_s']} s"))
    rows.append(
        ("speedup over YARA", f"{speed['search_only']}x search, {speed['search_and_verify']}x with verify")
    )
    precision = report["precision"]
    rows.append(("false negatives", str(precision["false_negatives"])))
    rows.append(("true matches / candidates", f"{precision['true_matches']} / {precision['candidates']}"))
    rows.append(
        (
            "false-positive share p50 / p90",
            f"{precision['fp_percent_of_docs_median']}% / "
            f"{precision['fp_percent_of_docs_p90']}% of documents",
        )
    )
    if "server_settle" in report:
        settled = report["server_settle"]
        text = f"{settled['segments_before']} -> {settled['segments']} segments in {settled['seconds']} s"
        rows.append(("server: settled before searching", text))
    if "server_search" in report:
        server = report["server_search"]
        rows.append(
            (
                "server: single rule p50 / p95",
                f"{server['single_rule_ms_p50']} / {server['single_rule_ms_p95']} ms",
            )
        )
        if "single_rule_server_side_ms_p50" in server:
            p50, p95 = server["single_rule_server_side_ms_p50"], server["single_rule_server_side_ms_p95"]
            rows.append(("  of which on the server", f"{p50} / {p95} ms"))
        if "repeated_rule_server_side_ms_p50" in server:
            p50, p95 = server["repeated_rule_server_side_ms_p50"], server["repeated_rule_server_side_ms_p95"]
            rows.append(("  the same rules again, on the server", f"{p50} / {p95} ms"))
        rows.append(
            ("server: bundles 1/10/100/1000", " / ".join(f"{v} s" for v in server["bundle_s"].values()))
        )
        rows.append(
            (
                "server RSS after searches",
                f"{server['server_rss_mb']} MB ({server.get('server_rss_anon_mb', '?')} MB anonymous)",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
