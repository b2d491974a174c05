"""Start-up time of the `sspry` command: `--help`, a `local search` of a 3-file forest and a `search` of
the same forest through a warm server, each run --runs times in a fresh process.

    .venv/bin/python scripts/startup_bench.py [--runs 10] [--bin .venv/bin/sspry]

Prints per command the median, min and max wall-clock time and the median CPU time (user + system) of
the child: on a shared machine the CPU time is the steadier number. The forest, rule and server live in
a temporary directory removed at the end; numba's on-disk cache is whatever the installation has (run
once before measuring: the first run of a machine compiles).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RULE = 'rule marker { strings: $a = "marker-2" condition: $a }\n'


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run of `command`, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def start_server(sspry: str, root: Path) -> tuple[subprocess.Popen, str]:
    """`sspry serve` on a free port; returns the process and the address it printed."""
    server = subprocess.Popen(
        [sspry, "serve", "--root", str(root), "--addr", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    )
    line = server.stdout.readline() if server.stdout else ""
    prefix = "sspry server listening on "
    if not line.startswith(prefix):
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return server, line[len(prefix) :].strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (after one warm-up)")
    parser.add_argument("--bin", default=str(Path(sys.executable).parent / "sspry"), help="the sspry command")
    args = parser.parse_args()
    sspry = args.bin
    with tempfile.TemporaryDirectory(prefix="sspry-startup-") as work:
        base = Path(work)
        files, root, rule = base / "files", base / "forest", base / "rule.yar"
        files.mkdir()
        for i in range(3):
            (files / f"f{i}.bin").write_bytes(os.urandom(4000) + f"hello marker-{i}\n".encode())
        rule.write_text(RULE)
        subprocess.run([sspry, "init", "--root", str(root)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [sspry, "local", "index", "--root", str(root), str(files)], check=True, capture_output=True
        )
        server, addr = start_server(sspry, root)
        try:
            commands = {
                "sspry --help": [sspry, "--help"],
                "sspry local search (3 files)": [
                    sspry,
                    "local",
                    "search",
                    "--root",
                    str(root),
                    "--rule",
                    str(rule),
                ],
                "sspry search --addr (warm server)": [sspry, "search", "--addr", addr, "--rule", str(rule)],
            }
            print(
                f"{'command':36} {'median':>8} {'min':>8} {'max':>8} {'cpu':>8}   ({args.runs} runs, seconds)"
            )
            for name, command in commands.items():
                timed(command)  # warm-up: page cache, numba cache, server maps
                walls, cpus = zip(*(timed(command) for _ in range(args.runs)), strict=True)
                print(
                    f"{name:36} {statistics.median(walls):8.3f} {min(walls):8.3f} {max(walls):8.3f} "
                    f"{statistics.median(cpus):8.3f}",
                    flush=True,
                )
        finally:
            subprocess.run([sspry, "shutdown", "--addr", addr], capture_output=True, timeout=30)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
