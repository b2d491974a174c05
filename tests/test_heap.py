"""`keep_heap` stops every YARA compilation from faulting its heap back in (sspry/heap.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sspry.heap import keep_heap

PROBE = """
import json, resource, sys, yara
from sspry.heap import keep_heap
kept = keep_heap() if sys.argv[1] == "keep" else None
source = 'import "pe"\\nrule a { strings: $a = "token" condition: $a }'
for _ in range(5):
    yara.compile(source=source)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    yara.compile(source=source)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults_per_compile": faults / 20}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_compiling_rules_stops_faulting_pages_once_the_heap_is_kept() -> None:
    if not keep_heap():
        pytest.skip("this C library has no mallopt")
    plain, kept = _probe("plain"), _probe("keep")
    assert kept["kept"] is True
    # glibc's defaults give each compilation's ~4 MB back and fault it in again (~1,000 pages)
    assert plain["faults_per_compile"] > 200, plain
    assert kept["faults_per_compile"] < plain["faults_per_compile"] / 4, (plain, kept)


def test_the_sspry_command_keeps_the_heap() -> None:
    """Every subcommand runs the group's callback, which keeps the heap (here `local info --help`)."""
    code = (
        "import sspry.cli as cli\n"
        "calls = []\n"
        "cli.keep_heap = lambda: calls.append(1) or True\n"
        "cli.main(['local', 'info', '--help'], standalone_mode=False)\n"
        "print(len(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"
