"""The quarantine: logged rows a publish cannot turn into a segment, set aside instead of blocking every row
after them, with a report saying why.

  <root>/quarantine/q_NNNNNNNNNN/   one entry per publish that set something aside (N: the last log it
                                    published, so entries sort by time)
      rows.bin      the rows, in the ingest log format (`read_log` reads them back)
      corrupt.bin   bytes of log frames that failed their checksum, back to back, as found
      report.json   {"format": 1, "published_log": N,
                     "rows": [{"source_id": hex, "log": name, "reason": text}, ...],
                     "corrupt": [{"log": name, "offset": n, "bytes": n}, ...]}

Rows land here when they fail validation at publish (a log written before a limit existed) or when a
segment cannot be built from them (the publish splits a failing group until it finds the rows that fail
alone). An entry is written like a segment (fresh temporary name, renamed into place) before the manifest
swap that publishes its logs: an entry whose published_log is past the manifest's comes from a publish
that did not finish, and is removed when a writer opens the Forest (its rows are still in their logs).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from sspry.store import diskio
from sspry.store.filenames import QUARANTINE_DIR, TEMP_PREFIX, quarantine_entry
from sspry.store.ingest_log import write_log
from sspry.v1 import sspry_pb2

QUARANTINE_FORMAT = 1
REPORT = "report.json"


@dataclass
class SetAside:
    """One row that could not be published, where it was logged, and why."""

    log: str
    row: sspry_pb2.DocumentRow
    reason: str


@dataclass
class CorruptSpan:
    log: str
    offset: int
    data: bytes


def _entry(root: Path, published_log: int) -> Path:
    return quarantine_entry(root, published_log)


def write_entry(root: Path, published_log: int, rows: list[SetAside], corrupt: list[CorruptSpan]) -> Path:
    """Write one quarantine entry durably; returns its directory."""
    final = _entry(root, published_log)
    diskio.make_dirs(final.parent)
    diskio.remove(final)  # a leftover of an attempt of this same publish that failed (never referenced)
    work = diskio.temp_name(final)
    try:
        diskio.make_dirs(work)
        write_log(work / "rows.bin", (r.row for r in rows))
        if corrupt:
            diskio.write_file(work / "corrupt.bin", b"".join(span.data for span in corrupt))
        report = {
            "format": QUARANTINE_FORMAT,
            "published_log": published_log,
            "rows": [{"source_id": r.row.source_id.hex(), "log": r.log, "reason": r.reason} for r in rows],
            "corrupt": [{"log": c.log, "offset": c.offset, "bytes": len(c.data)} for c in corrupt],
        }
        diskio.write_file(work / REPORT, json.dumps(report, indent=1).encode())
        diskio.fsync_path(work)
        diskio.rename_into_place(work, final)
    except BaseException:
        diskio.remove(work)
        raise
    return final


def remove_unfinished(root: Path, published_log: int) -> None:
    """Remove entries (and temporary directories) of publishes that did not reach their manifest swap."""
    directory = root / QUARANTINE_DIR
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        unfinished = entry.name.startswith("q_") and int(entry.name[2:]) > published_log
        if unfinished or entry.name.startswith(TEMP_PREFIX):
            diskio.remove(entry)


@dataclass
class QuarantineCounts:
    entries: int = 0
    rows: int = 0
    corrupt_bytes: int = 0


def counts(root: Path) -> QuarantineCounts:
    """What the quarantine holds (read from the reports)."""
    found = QuarantineCounts()
    directory = root / QUARANTINE_DIR
    if not directory.is_dir():
        return found
    for entry in sorted(directory.glob("q_*")):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads((entry / REPORT).read_text())
            found.entries += 1
            found.rows += len(report["rows"])
            found.corrupt_bytes += sum(span["bytes"] for span in report["corrupt"])
    return found
