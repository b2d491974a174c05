"""Crashes and a full disk, through scripts/fault_harness.py: a few of its cases, fast. The script runs
them all (`scripts/fault_harness.py --points 60`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from sspry.store import diskio

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_harness.py"


def _harness():
    spec = importlib.util.spec_from_file_location("fault_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_harness"] = module
    spec.loader.exec_module(module)
    return module


harness = _harness()


@pytest.fixture(autouse=True)
def _servers_and_disk():
    yield
    harness.Server.kill_all()
    diskio.free()


def assert_ok(row) -> None:
    assert row.reached, f"{row.case}: the fault did not happen"
    check = row.check
    assert (check.lost, check.duplicated, check.resurrected) == (0, 0, 0), row.line()
    assert check.ok, row.line()


def test_the_workload_passes_every_kill_point(tmp_path) -> None:
    passed = harness.census(tmp_path, 1)
    assert {name for name in harness.KILL_POINTS if not passed[name]} == set()
    assert len(harness.kill_cases(passed, 1000)) >= 60


@pytest.mark.parametrize(
    "case",
    [
        "log.append.torn:5",  # a torn frame at the end of the log
        "ingest.recorded:5",  # logged and recorded, not yet acknowledged
        "dedup.recorded:1",
        "segment.written:10",  # a segment complete under its temporary name
        "manifest.renamed:6",  # the swap done, its directory not yet fsynced
        "publish.swapped:4",  # published, logs not yet removed
        "tombstone.renamed:2",
        "compact.built:3",
    ],
)
def test_sigkill_at_a_kill_point_loses_nothing_acknowledged(tmp_path, case: str) -> None:
    row = harness.kill_case(tmp_path, case, 1)
    assert_ok(row)
    assert row.check.acked > 0


@pytest.mark.parametrize(
    ("what", "kill_at"), [("right after an ack", None), ("inside a publish", "segment.written:2")]
)
def test_a_server_killed_loses_nothing_acknowledged(tmp_path, what: str, kill_at: str | None) -> None:
    assert_ok(harness.server_kill_case(tmp_path, what, kill_at, 3))


def test_a_server_on_a_full_disk_refuses_inserts_then_publishes_everything_by_itself(tmp_path) -> None:
    """The disk is full for 2 s under continuous inserts: they fail, the maintenance thread's publishes
    fail and are retried with backoff, and once space is back every acknowledged row is published without
    a Publish call or a restart; a SIGKILL and a restart then lose nothing."""
    assert_ok(harness.server_disk_full(tmp_path, 5))


@pytest.mark.parametrize("share", [0.0, 0.35, 0.8])
def test_the_workload_on_a_full_disk_goes_on_once_space_is_freed(tmp_path, share: float) -> None:
    budget = int(share * harness.workload_bytes(tmp_path, 2))
    row = harness.enospc_case(tmp_path, budget, 2)
    assert_ok(row)
    assert row.faults > 0


def test_a_full_disk_then_sigkill_loses_nothing_acknowledged(tmp_path) -> None:
    """Finding 1 end to end: a torn append on a full disk, rows acknowledged after it, SIGKILL, restart."""
    budget = harness.workload_bytes(tmp_path, 2) // 3
    assert_ok(harness.enospc_child_case(tmp_path, budget, 2))
