#!/usr/bin/env python3
"""Time a search through a running `sspry web`, as an analyst's page sees it: from submitting the rule
file's text (POST /api/searches) to the first rule result readable through the API, and to the job's end.

  scripts/web_bench.py --url http://127.0.0.1:8080 --rule FILE [--verify] [--token T] [--repeat N]

Prints one JSON line per run: submit_ms (the POST, YARA's compile check included), first_result_ms (POST
sent -> a GET shows a rule result), done_ms, the server's own first_result_ms, rules, candidates.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path


def call(url: str, token: str | None, method: str = "GET", body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=600) as r:
        return json.loads(r.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rule", required=True, type=Path)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--token")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    text = args.rule.read_text()
    for _ in range(args.repeat):
        started = time.perf_counter()
        job_id = call(f"{args.url}/api/searches", args.token, "POST", {"rule": text, "verify": args.verify})[
            "id"
        ]
        submitted = time.perf_counter()
        first = None
        while True:
            job = call(f"{args.url}/api/searches/{job_id}?rules_limit=0", args.token)
            now = time.perf_counter()
            if first is None and job["rules_done"] > 0:
                first = now
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.01)
        row = {
            "id": job_id,
            "status": job["status"],
            "submit_ms": round((submitted - started) * 1000, 1),
            "first_result_ms": round((first - started) * 1000, 1) if first else None,
            "done_ms": round((now - started) * 1000, 1),
            "server_first_result_ms": round(job["first_result_ms"] or 0, 1),
            "rules": job["rule_total"],
            "candidates": job["candidate_total"],
            "verified": job["verified_total"],
            "documents": job["documents"],
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
