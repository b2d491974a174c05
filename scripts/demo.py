#!/usr/bin/env python3
"""`make demo`: index real files into an embedded local forest, search with the example rules, verify.

Indexes this machine's own executables and scripts (/usr/bin, /usr/sbin) plus generated files with
planted strings, searches each rule file of examples/rules with --verify, and compares with scanning
every file with YARA. Work happens in demo-work/ (recreated on each run); every step is the `sspry`
command a user would type, printed before it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yara

from sspry import synthetic
from sspry.features.walk import walk

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "demo-work"
RULES = REPO / "examples" / "rules"
SYSTEM = [d for d in ("/usr/bin", "/usr/sbin") if os.path.isdir(d)]
TOKENS = ["SsprYDemoBeacon", "CalcWinUpdater", "evil-payload-3f9a"]


def sspry(*args: str, capture: bool = False) -> str:
    print(f"\n$ sspry {shlex.join(args)}", flush=True)
    command = [sys.executable, "-m", "sspry", *args]
    if capture:
        return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    subprocess.run(command, check=True)
    return ""


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    generated = WORK / "generated"
    corpus = synthetic.generate(generated, 400, seed=7, tokens=TOKENS, plant_share=0.25)
    print(f"generated {len(corpus.files)} files ({corpus.bytes / 2**20:.1f} MiB) in {generated}")
    roots = [str(generated), *SYSTEM]
    root = str(WORK / "forest")

    sspry("init", "--root", root, "--store-path")
    started = time.perf_counter()
    sspry("local", "index", "--root", root, *roots)
    index_s = time.perf_counter() - started

    files = walk(roots).paths
    total_bytes = sum(os.path.getsize(p) for p in files)

    verified: dict[str, set[str]] = {}
    for rule_file in sorted(RULES.glob("*.yar")):
        if rule_file.name == "bundle.yar":
            continue
        args = ("local", "search", "--root", root, "--rule", str(rule_file), "--verify", "--json")
        result = json.loads(sspry(*args, capture=True))
        print(f"  searched {result['documents']} documents in {result['elapsed_ms']:.0f} ms, then verified")
        for rule in result["rules"]:
            matched = [c for c in rule["candidates"] if c["verified"]]
            verified[rule["rule"]] = {c["source_id"] for c in matched}
            print(
                f"  {rule['rule']:28s} candidates {rule['candidate_count']:5d}   verified {len(matched):5d}"
            )
            for candidate in matched[:3]:
                print(f"      {candidate['source_id'][:16]}…  {', '.join(candidate['paths'])}")

    # The bundle, searched in one pass; then the same rules by brute force: YARA over every file.
    started = time.perf_counter()
    sspry("local", "search", "--root", root, "--rule", str(RULES / "bundle.yar"), "--json", capture=True)
    bundle_s = time.perf_counter() - started
    bundle = yara.compile(filepath=str(RULES / "bundle.yar"))
    truth: dict[str, set[str]] = {}
    started = time.perf_counter()
    for path in files:
        with contextlib.suppress(yara.Error, OSError):
            data = Path(path).read_bytes()
            for match in bundle.match(data=data, timeout=60):
                truth.setdefault(match.rule, set()).add(hashlib.sha256(data).hexdigest())
    brute_s = time.perf_counter() - started

    info = json.loads(sspry("local", "info", "--root", root, capture=True))
    share = 100 * info["disk_bytes"] / info["document_bytes"]
    print("\nsummary")
    mib = total_bytes / 2**20
    print(f"  indexed {len(files)} files = {info['documents']} distinct documents ({mib:.0f} MiB)")
    database = info["disk_bytes"] / 2**20
    print(f"  in {index_s:.1f}s; database {database:.1f} MiB = {share:.1f}% of the documents' bytes")
    print(f"  bundle search (every example rule, one command): {bundle_s:.2f}s")
    print(f"  YARA scanning every file with the same rules: {brute_s:.2f}s")
    wrong = [rule for rule in verified if verified[rule] != truth.get(rule, set())]
    for rule in wrong:
        expected = len(truth.get(rule, ()))
        print(f"  MISMATCH {rule}: YARA matched {expected}, verified search {len(verified[rule])}")
    if wrong:
        sys.exit(1)
    print("  every rule: the verified matches are exactly the files YARA matches when it scans everything")


if __name__ == "__main__":
    main()
