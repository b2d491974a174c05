#!/usr/bin/env python3
"""What the yara-x modules' sidecar fields (macho, dex, lnk, crx) cost, in one run.

Two corpora: "typical" (this machine's executables, libraries and text: ELF, some PE, no Mach-O/DEX/LNK/
CRX) and "x" (Mach-O, DEX, LNK and CRX files: tests/xbuild.py's, plus real Mach-O files found under
--macho-dir). For each, with and without the yara-x modules (`metadata.x_fields` switched off is what
the sidecar was before them):

  module_fields  ms per file of the module part of the sidecar (files read beforehand)
  extract        ms per file of the whole extraction (extract_file, one thread)
  fields         module fields per document, and their bytes in a segment (16 each: name index,
                 document, value)
  forest         bytes of a forest holding the corpus (blooms, columns, fields, catalog)

  scripts/sidecar_bench.py [--files 2000] [--repeat 3] [--macho-dir /usr/lib/google-cloud-sdk]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.xbuild

import sspry
from sspry.features import metadata, xmodules
from sspry.features.extract import extract_file
from sspry.policy import Policy
from tests import xbuild

FIELD_BYTES = 16  # field_name uint32 + field_doc uint32 + field_value int64 per stored field


def typical_files(count: int) -> list[Path]:
    found: list[Path] = []
    for folder in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc", "/usr/lib/python3"):
        for directory, _, names in os.walk(folder):
            for name in sorted(names):
                path = Path(directory, name)
                if path.is_file() and not path.is_symlink() and 0 < path.stat().st_size < (8 << 20):
                    found.append(path)
                if len(found) >= count:
                    return found
    return found


def x_files(directory: Path, macho_dir: str | None) -> list[Path]:
    """The built files of every kind, a few variants each, and real Mach-O files under macho_dir."""
    built = {
        **{f"macho{i}": xbuild.macho(segments=i) for i in range(1, 9)},
        "fat": xbuild.fat(xbuild.macho(), xbuild.macho(cputype=xbuild.CPU_TYPE_ARM64)),
        **{f"dex{v}": xbuild.dex(v) for v in (35, 36, 37, 38, 39)},
        **{f"lnk{i}": xbuild.lnk(file_size=i) for i in range(5)},
        "crx2": xbuild.crx(2),
        "crx3": xbuild.crx(3),
    }
    paths = []
    for name, data in built.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    if macho_dir:
        for root, _, names in os.walk(macho_dir):
            for name in names:
                path = Path(root, name)
                if path.is_file() and not path.is_symlink():
                    with open(path, "rb") as handle:
                        head = handle.read(4)
                    if head.startswith(xmodules.MAGICS["macho"]) and path.stat().st_size < (64 << 20):
                        paths.append(path)
    return paths


def per_file_ms(paths: list[Path], work: Callable[[Path], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for path in paths:
            work(path)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / max(len(paths), 1)


def forest_bytes(paths: list[Path], directory: Path) -> int:
    db = sspry.Database.create(directory, store_path=True)
    try:
        db.index([str(p) for p in paths], workers=1)
    finally:
        db.close()
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and "plans" not in f.parts)


def measure(name: str, paths: list[Path], repeat: int, work_dir: Path) -> dict:
    """Both variants, timed in alternation (best of `repeat` each), so load from other processes on the
    machine falls on both alike."""
    data = {p: p.read_bytes() for p in paths}
    policy = Policy()
    real = metadata.x_fields
    variants = {"without": lambda d, h: {}, "with": real}
    out: dict = {"files": len(paths), "mb": round(sum(map(len, data.values())) / 1e6, 1)}
    times: dict[tuple[str, str], float] = {}
    try:
        for _ in range(repeat):
            for label, x_fields in variants.items():
                metadata.x_fields = x_fields
                for kind, work in (
                    ("module_fields_ms", lambda p: metadata.module_fields(data=data[p])),
                    ("extract_ms", lambda p: extract_file(str(p), policy)),
                ):
                    took = per_file_ms(paths, work, 1)
                    times[label, kind] = min(times.get((label, kind), took), took)
        for label, x_fields in variants.items():
            metadata.x_fields = x_fields
            stored = sum(len(metadata.module_fields(data=data[p])[0]) for p in paths)
            out[label] = {
                **{kind: round(ms, 4) for (of, kind), ms in times.items() if of == label},
                "fields_per_doc": round(stored / len(paths), 2),
                "field_bytes_per_doc": round(FIELD_BYTES * stored / len(paths), 1),
                "forest_bytes": forest_bytes(paths, work_dir / f"{name}-{label}"),
            }
    finally:
        metadata.x_fields = real
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--macho-dir", default="/usr/lib/google-cloud-sdk")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        (work / "x").mkdir()
        extract_file(str(typical_files(1)[0]), Policy())  # compile/load the kernels before timing
        report = {
            "typical": measure("typical", typical_files(args.files), args.repeat, work),
            "x": measure("x", x_files(work / "x", args.macho_dir), args.repeat, work),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
