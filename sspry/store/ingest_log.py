"""The durable ingest log: where inserted documents wait, fsynced, until a publish makes them a segment.

A log file is a sequence of frames `u32 length | u32 crc32 | DocumentRow protobuf`. Appends are
acknowledged only after fsync. A crash can leave a torn last frame; readers stop at the first frame that
is short or fails its checksum and report how many bytes they dropped, so nothing acknowledged is lost.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sspry.store import diskio
from sspry.v1 import sspry_pb2

_HEADER = struct.Struct("<II")
LOG_PREFIX = "log_"


@dataclass
class IngestResult:
    inserted: int = 0  # new documents, durable in the log and published by the next publish
    duplicates: int = 0  # documents the forest already held: only their files were recorded

    def __iadd__(self, other: IngestResult) -> IngestResult:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        return self


def log_name(seq: int) -> str:
    return f"{LOG_PREFIX}{seq:010d}.bin"


def log_seq(path: Path) -> int:
    return int(path.name[len(LOG_PREFIX) : -len(".bin")])


class LogWriter:
    """Appends rows to one log file. Not thread-safe: callers serialise appends."""

    def __init__(self, path: Path):
        self.path = path
        self._file = diskio.OutFile(path, append=True)
        self.bytes = self._file.tell()
        self.rows = 0

    def append(self, rows: Iterable[sspry_pb2.DocumentRow]) -> int:
        """Append rows and make them durable; returns how many were written."""
        count = 0
        for row in rows:
            payload = row.SerializeToString()
            self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
            self._file.write(payload)
            self.bytes += _HEADER.size + len(payload)
            count += 1
        self._file.sync()
        self.rows += count
        return count

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> tuple[list[sspry_pb2.DocumentRow], int]:
    """The intact rows of a log, and how many trailing bytes were torn or corrupt (dropped)."""
    data = path.read_bytes()
    rows = []
    at = 0
    while at + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, at)
        start = at + _HEADER.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        row = sspry_pb2.DocumentRow()
        row.ParseFromString(payload)
        rows.append(row)
        at = start + length
    return rows, len(data) - at
