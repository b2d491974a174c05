#!/usr/bin/env python3
"""Feature extraction speed: MB/s per core on 100 MB files of three kinds, in one run.

  random      os.urandom: every gram distinct, the worst case for bloom building
  binaries    this machine's executables concatenated: what sspry mostly indexes
  text        English-like text from sspry.synthetic

Each file is extracted several times on one thread (best and median reported, with the best CPU time:
on a shared machine the wall clock says more about the neighbours); then the same files on all cores
through the thread pool, for the parallel speed-up. Warm page cache: the files are read once before
timing. Another tree's code is measured with the same script through PYTHONPATH.

  scripts/extract_bench.py [--mb 100] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from sspry import synthetic
from sspry.features.extract import extract_file, extract_many
from sspry.policy import Policy


def make_inputs(directory: Path, size: int) -> dict[str, Path]:
    inputs = {}
    path = directory / "random.bin"
    path.write_bytes(os.urandom(size))
    inputs["random"] = path
    chunks, total = [], 0
    for folder in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate) and not os.path.islink(candidate) and total < size:
                data = Path(candidate).read_bytes()
                chunks.append(data)
                total += len(data)
    path = directory / "binaries.bin"
    path.write_bytes(b"".join(chunks)[:size])
    inputs["binaries"] = path
    path = directory / "text.bin"
    path.write_bytes(synthetic._text(random.Random(1), size))
    inputs["text"] = path
    return inputs


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    policy = Policy()
    cores = len(os.sched_getaffinity(0))
    report: dict = {"file_mb": args.mb, "cores": cores, "kinds": {}}
    with tempfile.TemporaryDirectory(prefix="sspry-extract-") as scratch:
        inputs = make_inputs(Path(scratch), args.mb << 20)
        extract_file(str(inputs["text"]), policy)  # compile (or load) the kernels outside the timing
        for kind, path in inputs.items():
            size_mb = path.stat().st_size / (1 << 20)
            times, cpu = [], []
            for _ in range(args.repeat):
                started, started_cpu = time.perf_counter(), time.process_time()
                doc = extract_file(str(path), policy)
                times.append(time.perf_counter() - started)
                cpu.append(time.process_time() - started_cpu)
            copies = [str(path)] * cores
            started = time.perf_counter()
            for _ in extract_many(copies, policy, cores):
                pass
            parallel = time.perf_counter() - started
            row = {
                "mb": round(size_mb, 1),
                "best_s": round(min(times), 3),
                "median_s": round(statistics.median(times), 3),
                "mb_per_s_per_core": round(size_mb / min(times), 1),
                "best_cpu_s": round(min(cpu), 3),
                "mb_per_cpu_s": round(size_mb / min(cpu), 1),
                "mb_per_s_all_cores": round(size_mb * cores / parallel, 1),
                "tier1_bloom_kb": len(doc.tier1) >> 10,
                "tier2_bloom_kb": len(doc.tier2) >> 10,
                "bloom_share_of_file": round((len(doc.tier1) + len(doc.tier2)) / path.stat().st_size, 3),
            }
            report["kinds"][kind] = row
            print(
                f"{kind:9s} {row['mb']:6.1f} MB  best {row['best_s']:6.2f}s  "
                f"{row['mb_per_s_per_core']:6.1f} MB/s/core ({row['mb_per_cpu_s']:6.1f} per CPU s)  "
                f"{row['mb_per_s_all_cores']:6.1f} MB/s on {cores} cores  "
                f"blooms {row['bloom_share_of_file']:.1%} of the file"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
