#!/usr/bin/env python3
"""Time evaluation alone, as a warm server runs it: rules planned once, `search_snapshot` timed.

  scripts/search_bench.py ROOT [--singles DIR] [--bundle FILE ...] [--reps 3] [--json OUT]

Each rule file of DIR (a single rule each, e.g. bench-work/docs-N/corpus/rules/single) is searched
--reps times and its median kept; the report gives the p50/p95 over files, in wall clock and CPU
milliseconds (CPU time shows the work when the machine is shared). Each --bundle file is searched
--reps times, the first run compiling its plans. With --json the candidates of every rule are written
too, so two versions of the code (run one through PYTHONPATH) can be held to the same candidates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sspry.query.rules import load_rules
from sspry.query.ruleset import iter_source_plans
from sspry.query.search import search_snapshot
from sspry.store.forest import Forest


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--singles", type=Path)
    parser.add_argument("--bundle", nargs="*", default=[], type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", dest="json_out", type=Path)
    args = parser.parse_args()

    report: dict = {}
    candidates: dict[str, list[str]] = {}
    with Forest.open(args.root) as forest:
        snapshot = forest.snapshot()
        report["documents"], report["segments"] = snapshot.documents, len(snapshot.views)

        def plans_of(path: Path):
            return list(iter_source_plans(load_rules(path=str(path)), forest.policy))

        def timed(path: Path, plans) -> tuple[list[float], list[float], object]:
            walls, cpus, result = [], [], None
            for _ in range(args.reps):
                wall, cpu = time.perf_counter(), time.process_time()
                result = search_snapshot(snapshot, plans, forest.policy)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            for rule in result.rules:
                candidates[f"{path.name}:{rule.name}"] = sorted(c.source_id.hex() for c in rule.candidates)
            return walls, cpus, result

        if args.singles:
            singles = [(path, plans_of(path)) for path in sorted(args.singles.glob("*.yar"))]
            for _, plans in singles[:3]:  # load the kernels and the maps
                search_snapshot(snapshot, plans, forest.policy)
            walls, cpus = [], []
            for path, plans in singles:
                wall, cpu, _ = timed(path, plans)
                walls.append(statistics.median(wall) * 1000)
                cpus.append(statistics.median(cpu) * 1000)
            report["single_ms"] = {
                "rules": len(walls),
                "p50": round(statistics.median(walls), 3),
                "p95": round(percentile(walls, 0.95), 3),
                "cpu_p50": round(statistics.median(cpus), 3),
            }
        for path in args.bundle:
            plans = plans_of(path)
            wall, cpu, _ = timed(path, plans)
            report[f"bundle {path.name}"] = {
                "rules": len(plans),
                "runs_s": [round(w, 3) for w in wall],
                "cpu_s": [round(c, 3) for c in cpu],
            }
    print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps({"report": report, "candidates": candidates}))


if __name__ == "__main__":
    main()
