#!/usr/bin/env python3
"""Whole rule sets against brute force, in one run: what a prefilter is for.

For each rule set (the whole directory as one bundle, then each top-level folder as its own set):
brute-force yara-python over every corpus file (2 processes, rules compiled once), as `yara` scans by
default and in libyara's fast mode (`yara -f`: same rules match, a string's search stops at its first
match unless the condition counts or places its matches), then sspry through a
real server on loopback — the first search, a repeated one, and a search with --verify — each a `sspry
search` command timed from outside (wall clock, the client's peak RSS) while the server's peak RSS is
read from /proc. Prints a table with the ratios (the faster brute force's time / sspry's time: above
1, sspry is faster).

The physical limit of search + verify is timed too ("limit"): a repeated search, plus yara-python (fast
mode, same processes) over only the files the brute force found a match in, each content once. That is
what search + verify would take if the prefilter returned exactly the files YARA matches and
verification cost nothing beyond scanning them with the whole set. Where verification scans with one
group (capabilities/, antidebug_antivm/, deprecated/ and utils/ of Yara-Rules are), no prefilter can do
much better (verification leaves out the rules without candidates, which the limit's scan keeps), so
such a set whose limit ratio is well under a target cannot reach it. A large set is verified in groups
of rules by their candidates, which can beat this limit by far (packers/: 14.3 s against 37.8 s).

  scripts/ruleset_bench.py --corpus DIR [DIR ...] --rules DIR [--sets all,malware,...] [--work DIR]
                           [--engines yara,yara-x] [--brute full,fast] [--json OUT]

A set's bundle concatenates its rule files, leaving out files YARA does not compile alone, files with
`include` or `global` rules (a global rule would restrict the rules of other files once they share a
namespace) and files that define a rule name an earlier file defined; both sides scan the same bundle.
The forest is built once in WORK (reused by later runs with the same corpus); `--reindex` rebuilds it.
Each server is searched once it has settled (merged each shard into one segment, as a server does once
inserts stop), so no merge runs while a search is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yara

from sspry.features.walk import walk
from sspry.store.filenames import PLANS_DIR

_SCANNER: yara.Rules | None = None
_FAST = False


def rule_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yar", ".yara") and p.is_file())


def build_set(files: list[Path], out: Path) -> tuple[int, int]:
    """Write the bundle of `files` to `out`; returns (rule files kept, rules)."""
    names: set[str] = set()
    kept: list[str] = []
    for path in files:
        text = path.read_text(errors="replace")
        try:
            compiled = list(yara.compile(source=text, includes=False))
        except yara.Error:
            continue  # does not compile alone, or has includes
        found = {r.identifier for r in compiled}
        if any(r.is_global for r in compiled) or found & names:
            continue
        names |= found
        kept.append(text)
    out.write_text("\n".join(kept))
    compiled = yara.compile(filepath=str(out))  # the bundle must compile as a whole
    return len(kept), sum(1 for _ in compiled)


def _load_scanner(saved: str, fast: bool) -> None:
    global _SCANNER, _FAST
    _SCANNER, _FAST = yara.load(saved), fast


def _scan(path: str) -> tuple[str, int]:
    try:
        assert _SCANNER is not None
        return path, len(_SCANNER.match(path, timeout=120, fast=_FAST))
    except yara.Error:
        return path, 0


def brute_force(bundle: Path, files: list[str], processes: int, fast: bool) -> tuple[float, list[str]]:
    """Seconds for yara-python to scan every file with the bundle, in `processes` processes (`fast`: in
    libyara's fast mode), and the files with a match."""
    with tempfile.TemporaryDirectory() as scratch:
        saved = os.path.join(scratch, "rules.bin")
        yara.compile(filepath=str(bundle)).save(saved)
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(processes, _load_scanner, (saved, fast)) as pool:
            matched = [path for path, found in pool.imap_unordered(_scan, files, chunksize=8) if found]
        return time.perf_counter() - started, sorted(matched)


def distinct_contents(paths: list[str]) -> list[str]:
    """One path per distinct content (sha256) among `paths`: verification reads each document once."""
    seen: dict[bytes, str] = {}
    for path in paths:
        with open(path, "rb") as handle:
            seen.setdefault(hashlib.file_digest(handle, "sha256").digest(), path)
    return sorted(seen.values())


def timed(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stdout) of a command that must succeed. The peak is the largest
    VmHWM read while it runs: a child's own rusage would count the memory of this process it was forked
    from."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=out, stderr=err)
        peak = 0
        while child.poll() is None:
            time.sleep(0.05)  # first: a forked child shows this process's memory until it execs
            try:
                with open(f"/proc/{child.pid}/status") as status:
                    line = next((x for x in status if x.startswith("VmHWM:")), "VmHWM: 0 kB")
                peak = max(peak, int(line.split()[1]))
            except (OSError, ValueError):
                pass
        elapsed = time.perf_counter() - started
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed: {err.read().decode(errors='replace')}")
        out.seek(0)
        return elapsed, peak, out.read().decode()


class Server:
    """`sspry serve` on a free loopback port, its peak RSS readable and resettable."""

    def __init__(self, sspry: list[str], root: Path):
        self.sspry = sspry
        self.process = subprocess.Popen(
            [*sspry, "serve", "--root", str(root), "--addr", "127.0.0.1:0", "--settle-after", "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"server did not start: {line}")
        self.addr = line.split()[-1]

    def settle(self) -> None:
        """Wait until the server has merged each shard into one segment (it does once inserts stop), so
        no merge runs while a search is timed."""
        while True:
            info = json.loads(
                subprocess.run(
                    [*self.sspry, "info", "--addr", self.addr], capture_output=True, check=True
                ).stdout
            )
            if info["segments"] <= info["trees"] * info["shards"]:
                return
            time.sleep(1)

    def reset_peak(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (our own process)

    def peak_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--rules", required=True, type=Path, help="a rule directory (e.g. Yara-Rules)")
    parser.add_argument(
        "--sets", default="", help="comma-separated: all and/or top-level folders (default: all)"
    )
    parser.add_argument("--work", type=Path, default=Path("bench-work/ruleset"))
    parser.add_argument("--processes", type=int, default=2, help="yara-python processes")
    parser.add_argument("--reindex", action="store_true")
    parser.add_argument(
        "--engines",
        default="yara",
        help="comma-separated engines to verify with (yara, yara-x): a verify run each  [default: yara]",
    )
    parser.add_argument(
        "--brute",
        default="full,fast",
        help="comma-separated brute forces to time: full (as `yara` scans), fast (`yara -f`); ratios "
        "are against the faster  [default: full,fast]",
    )
    parser.add_argument("--json", dest="json_out", type=Path)
    args = parser.parse_args()

    sspry = [sys.executable, "-m", "sspry"]
    folders = sorted(p.name for p in args.rules.iterdir() if p.is_dir())
    wanted = [s for s in args.sets.split(",") if s] or ["all", *folders]
    files = walk(args.corpus).paths
    corpus_bytes = sum(os.path.getsize(p) for p in files)
    print(f"corpus: {len(files)} files, {corpus_bytes / 2**20:.0f} MiB", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    root = args.work / "forest"
    if args.reindex or not (root / "manifest.json").exists():
        subprocess.run([*sspry, "init", "--root", str(root), "--store-path", "--force"], check=True)
        server = Server(sspry, root)
        try:
            seconds, _, out = timed([*sspry, "index", "--addr", server.addr, "--json", *args.corpus])
            summary = json.loads(out)
            print(f"indexed {summary['inserted_documents']} documents in {seconds:.1f} s", flush=True)
        finally:
            server.stop()

    rows = []
    for name in wanted:
        source = args.rules if name == "all" else args.rules / name
        bundle = args.work / f"{name}.yar"
        kept, rules = build_set(rule_files(source), bundle)
        if not rules:
            continue
        brute, matched = {}, []
        for mode in args.brute.split(","):
            seconds, matched = brute_force(bundle, files, args.processes, mode == "fast")
            brute[f"yara_{mode}_s"] = round(seconds, 2)
        yara_s = min(brute.values())
        matching = distinct_contents(matched)
        oracle_s, _ = brute_force(bundle, matching, args.processes, fast=True)
        # The first search is cold: a fresh server and no stored plans (the plan cache is derived data).
        shutil.rmtree(root / PLANS_DIR, ignore_errors=True)
        server = Server(sspry, root)
        try:
            server.settle()
            row = {"set": name, "rule_files": kept, "rules": rules, **brute}
            search = [*sspry, "search", "--addr", server.addr, "--rule", str(bundle), "--json"]
            runs = [("first", search), ("repeated", search)]
            for engine in args.engines.split(","):
                label = "verify" if engine == "yara" else f"verify_{engine.replace('-', '_')}"
                runs.append((label, [*search, "--verify", "--engine", engine]))
            for label, command in runs:
                server.reset_peak()
                seconds, client_kib, out = timed(command)
                row[f"{label}_s"] = round(seconds, 2)
                row[f"{label}_ratio"] = round(yara_s / seconds, 2)
                row[f"{label}_client_mib"] = round(client_kib / 1024)
                row[f"{label}_server_mib"] = round(server.peak_kib() / 1024)
                if label == "first":
                    result = json.loads(out)
                    row["candidate_pairs"] = sum(r["candidate_count"] for r in result["rules"])
                    row["documents"] = result["documents"]
        finally:
            server.stop()
        row["matching_documents"] = len(matching)
        row["limit_s"] = round(row["repeated_s"] + oracle_s, 2)
        row["limit_ratio"] = round(yara_s / row["limit_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    brutes = [k for k in rows[0] if k.startswith("yara_")] if rows else []
    labels = [k[: -len("_s")] for k in rows[0] if k.endswith("_s") and k not in brutes] if rows else []
    header = ["set", "rules", *(k[: -len("_s")] for k in brutes)]
    for label in labels:
        header += [f"{label[:8]} s", "x"]
    header += ["client MiB", "server MiB"]
    print("\n" + "  ".join(f"{h:>10}" for h in header))
    for row in rows:
        values = [row["set"][:10], row["rules"], *(row[k] for k in brutes)]
        for label in labels:
            values += [row[f"{label}_s"], row[f"{label}_ratio"]]
        values += [
            max(v for k, v in row.items() if k.endswith("_client_mib")),
            max(v for k, v in row.items() if k.endswith("_server_mib")),
        ]
        print("  ".join(f"{v:>10}" for v in values))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"corpus_files": len(files), "corpus_bytes": corpus_bytes, "sets": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
