#!/usr/bin/env python3
"""Load: N clients search in a loop while one client indexes, against one `sspry serve` process.

Checks, for every search: no error; the candidates of rules that only match the base corpus never
change; the document count and every rule's candidate set never shrink (only inserts happen, and each
search sees one consistent snapshot). Reports searches/s and index MB/s.

  scripts/load_test.py [--seconds 60] [--clients 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sspry import synthetic
from sspry.client.cluster import Cluster
from sspry.policy import Policy
from sspry.query.rules import load_rules
from sspry.store.forest import Forest

BASE_TOKENS = ["BaseCorpusToken", "StableMarker77"]
NEW_TOKENS = ["IncomingToken", "FreshArrival99"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sspry-load-") as scratch:
        work = Path(scratch)
        base = synthetic.generate(work / "base", 400, seed=1, tokens=BASE_TOKENS, max_size=256 << 10)
        root = work / "forest"
        Forest.init(root, Policy(store_path=True))
        server = subprocess.Popen(
            [sys.executable, "-m", "sspry", "serve", "--root", str(root), "--addr", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        addr = server.stdout.readline().rsplit(" ", 1)[1].strip()
        rules = work / "rules.yar"
        rules.write_text(synthetic.rules_for(BASE_TOKENS + NEW_TOKENS))
        source = load_rules(path=str(rules))
        # exact-case rules over the base tokens: a new file can only become their candidate through a
        # bloom false positive, which for 8+ grams at these fps is vanishingly rare
        stable = {
            i
            for i, name in enumerate(source.targets)
            if name.startswith(("ascii_", "wide_", "hex_")) and name.endswith(("_0", "_1"))
        }
        try:
            with Cluster([addr]) as cluster:
                cluster.index([str(base.directory)])
            stop = time.monotonic() + args.seconds
            errors: list[str] = []
            counts = {"searches": 0}
            lock = threading.Lock()
            indexed = {"bytes": 0, "files": 0, "seconds": 0.0}

            def searcher() -> None:
                previous: list[set[bytes]] | None = None
                documents = 0
                with Cluster([addr]) as cluster:
                    while time.monotonic() < stop:
                        try:
                            result = cluster.search(path=str(rules))
                        except Exception as exc:
                            errors.append(f"search: {exc}")
                            continue
                        current = [{c.source_id for c in r.candidates} for r in result.rules]
                        if result.documents < documents:
                            errors.append(f"document count went down: {documents} -> {result.documents}")
                        documents = result.documents
                        if previous is not None:
                            for i, (before, now) in enumerate(zip(previous, current, strict=True)):
                                if not before <= now:
                                    errors.append(f"{source.targets[i]} lost candidates")
                                if i in stable and before != now:
                                    errors.append(
                                        f"{source.targets[i]} changed though no new file matches it"
                                    )
                        previous = current
                        with lock:
                            counts["searches"] += 1

            def indexer() -> None:
                round_ = 0
                with Cluster([addr]) as cluster:
                    while time.monotonic() < stop:
                        batch = synthetic.generate(
                            work / f"new{round_}", 100, seed=100 + round_, tokens=NEW_TOKENS, max_size=1 << 20
                        )
                        started = time.perf_counter()
                        try:
                            cluster.index([str(batch.directory)])
                        except Exception as exc:
                            errors.append(f"index: {exc}")
                        indexed["seconds"] += time.perf_counter() - started
                        indexed["bytes"] += batch.bytes
                        indexed["files"] += len(batch.files)
                        round_ += 1

            threads = [threading.Thread(target=searcher) for _ in range(args.clients)]
            threads.append(threading.Thread(target=indexer))
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            with Cluster([addr]) as cluster:
                final = cluster.info()[0]
                cluster.shutdown()
        finally:
            server.wait(timeout=120)
    report = {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "searches": counts["searches"],
        "searches_per_s": round(counts["searches"] / elapsed, 2),
        "index_files": indexed["files"],
        "index_mb_per_s": round(indexed["bytes"] / (1 << 20) / max(indexed["seconds"], 1e-9), 2),
        "documents_at_end": final["documents"],
        "errors": len(errors),
        "first_errors": errors[:10],
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
