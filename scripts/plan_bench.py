#!/usr/bin/env python3
"""Planning speed: yaramod parse, cold planning, warm planning (plan cache in memory, and on disk from a
fresh process), per rule, for a directory of rules as one bundle and per top-level folder -- against an
older commit in the same run.

  scripts/plan_bench.py --rules DIR [--against REV ...] [--runs 3] [--json OUT]

Every measurement runs in a fresh worker process, the trees interleaved run by run (old, new, old,
new, ...), and the median is reported. Times are CPU seconds of the worker (other work on a shared
machine moves them less than wall time); numpy is imported before timing, as a search has it loaded.
The bundle is every rule file concatenated (their rule names must not clash). `--against REV` checks
REV out into a temporary git worktree and runs the same measurements with it on PYTHONPATH (given
several times, each revision; all interleaved in the same runs); a tree without a plan cache reports cold
times only.

  cold     plan_rules over the parsed bundle, no cache (parse excluded)
  store    plan_rules over the text with an empty on-disk cache: parse + plan + storing every plan
  warm     the same again in that process: from the memory cache (a source seen before is not parsed)
  disk     a fresh process with the stored cache: from disk (not parsed either)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rule_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yar", ".yara") and p.is_file())


def bundle(files: list[Path]) -> tuple[str, list[str]]:
    """The files as one source text, and its public rules (as yara-python names them)."""
    import yara

    text = "\n".join(p.read_text(errors="replace") for p in files)
    compiled = yara.compile(source=text)
    return text, [r.identifier for r in compiled if not r.is_private]


# --- worker: runs with the tree under test on sys.path ----------------------------------------------
def _planner():
    try:
        from sspry.query.ruleset import plan_rules
    except ImportError:  # trees before the planner split
        from sspry.query.condition import plan_rules  # type: ignore[no-redef]
    try:
        from sspry.query.plancache import PlanCache
    except ImportError:  # trees before the plan cache
        PlanCache = None
    return plan_rules, PlanCache


def _timed(function):
    started = time.process_time()
    result = function()
    return result, time.process_time() - started


def worker(rules: Path, mode: str, cache_dir: str) -> dict:
    import numpy  # noqa: F401 - a search has it loaded; the planner uses it for long patterns

    from sspry.policy import Policy
    from sspry.query.rules import yaramod_parser

    plan_rules, PlanCache = _planner()
    policy = Policy()
    if mode == "disk":
        text, targets = bundle(rule_files(rules))
        cache = PlanCache(cache_dir)
        plans, disk = _timed(lambda: plan_rules(text, targets, policy, cache=cache))
        return {"rules": len(plans), "disk_s": disk, "disk_hits": cache.hits}
    groups = {"bundle": rule_files(rules)}
    if mode == "folders":
        groups = {d.name: rule_files(d) for d in sorted(rules.iterdir()) if d.is_dir() and rule_files(d)}
    report = {}
    for name, files in groups.items():
        text, targets = bundle(files)
        parsed, parse = _timed(lambda text=text: yaramod_parser().parse_string(text))
        plans, cold = _timed(lambda parsed=parsed, targets=targets: plan_rules(parsed, targets, policy))
        row = {"rules": len(plans), "parse_s": parse, "cold_s": cold}
        del plans, parsed
        gc.collect()  # the cold plans' nodes die: the next runs start from an empty intern table
        if PlanCache is not None and mode == "bundle":
            cache = PlanCache(cache_dir)
            search = lambda text=text, targets=targets, cache=cache: plan_rules(  # noqa: E731
                text, targets, policy, cache=cache
            )
            _, row["store_s"] = _timed(search)
            _, row["warm_s"] = _timed(search)
            cache.close()
        report[name] = row
    return report


# --- driver --------------------------------------------------------------------------------------------
def run_worker(tree: Path, rules: Path, mode: str, cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, __file__, "--worker", mode, "--rules", str(rules), "--cache-dir", cache_dir]
    out = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(trees: dict[str, Path], rules: Path, runs: int) -> dict:
    samples: dict[str, dict[str, dict[str, list[float]]]] = {label: {} for label in trees}
    counts: dict[str, int] = {}
    for _ in range(runs):
        for label, tree in trees.items():  # interleaved: old, new, old, new, ...
            with tempfile.TemporaryDirectory(prefix="sspry-plan-bench-") as cache_dir:
                results = {**run_worker(tree, rules, "bundle", cache_dir)}
                if "store_s" in results["bundle"]:
                    results["bundle"].update(run_worker(tree, rules, "disk", cache_dir))
            results.update(run_worker(tree, rules, "folders", ""))
            for group, row in results.items():
                counts[group] = row["rules"]
                for key, value in row.items():
                    if key.endswith("_s"):
                        samples[label].setdefault(group, {}).setdefault(key, []).append(value)
    return {
        label: {
            group: {"rules": counts[group], **{k: statistics.median(v) for k, v in values.items()}}
            for group, values in groups.items()
        }
        for label, groups in samples.items()
    }


def print_report(report: dict) -> None:
    labels = list(report)
    header = f"{'group':<18}{'rules':>7}" + "".join(
        f"{label + ' ' + c:>16}" for label in labels for c in ("parse s", "cold s", "ms/rule")
    )
    print(header)
    for group in report[labels[-1]]:
        rules = report[labels[-1]][group]["rules"]
        cells = ""
        for label in labels:
            row = report[label].get(group, {})
            cold = row.get("cold_s", float("nan"))
            cells += f"{row.get('parse_s', float('nan')):>16.3f}{cold:>16.3f}{1000 * cold / rules:>16.3f}"
        print(f"{group:<18}{rules:>7}{cells}")
    for label in labels:
        row = report[label]["bundle"]
        if "store_s" in row:
            rules = row["rules"]
            print(
                f"{label}: bundle parse+plan+store {row['store_s']:.3f} s, warm from memory "
                f"{row['warm_s']:.3f} s ({1000 * row['warm_s'] / rules:.3f} ms/rule), warm from disk in a "
                f"fresh process {row['disk_s']:.3f} s ({1000 * row['disk_s'] / rules:.3f} ms/rule)"
            )
    new = report[labels[-1]]["bundle"]["cold_s"]
    for label in labels[:-1]:
        old = report[label]["bundle"]["cold_s"]
        print(f"cold planning, bundle: {old / new:.2f}x ({label} {old:.3f} s, {labels[-1]} {new:.3f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", required=True, type=Path)
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        help="a git revision to compare with (run from a temporary worktree); may be given several times",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--worker", choices=("bundle", "folders", "disk"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rules.resolve(), args.worker, args.cache_dir)))
        return 0
    rules = args.rules.resolve()
    trees: dict[str, Path] = {}
    try:
        for revision in args.against:
            scratch = tempfile.mkdtemp(prefix="sspry-plan-bench-tree-")
            trees[revision if len(args.against) > 1 else "old"] = Path(scratch)
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", scratch, revision],
                check=True,
                capture_output=True,
            )
        report = measure({**trees, "new": REPO}, rules, args.runs)
    finally:
        for scratch in trees.values():
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(scratch)], check=False
            )
    print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
