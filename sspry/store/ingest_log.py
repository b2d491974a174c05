"""The durable ingest log: where inserted documents wait, fsynced, until a publish makes them a segment.

Format 2 (written now): a header `"SSPRYLOG" | u32 format`, then frames
`u32 magic | u32 length | u32 crc32(length, payload) | DocumentRow protobuf`.
Format 1 (logs written before the header existed): frames `u32 length | u32 crc32 | payload`, nothing else;
still read, never written.

An append is acknowledged only after fsync. An append that fails is cut back to where it started (the
file truncated and fsynced) before anything else is appended; if even that fails, the writer is marked
broken and the forest opens a new log for the next append, so a torn frame is always the last thing in
its file and never strands an acknowledged row behind it.

Reading never stops at a bad frame: it skips it, resynchronises on the next frame whose magic, length
and checksum hold, and reports what it skipped (corrupt spans in the middle; a torn tail after the last
intact frame, which is a write cut short and was never acknowledged).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from sspry.store import diskio
from sspry.store.errors import format_error
from sspry.store.killpoints import kill_point
from sspry.v1 import sspry_pb2

LOG_FORMAT = 2
FILE_MAGIC = b"SSPRYLOG"
FRAME_MAGIC = b"\xf5SRF"
_FILE_HEADER = struct.Struct("<8sI")
_FRAME = struct.Struct("<4sII")  # magic, length, crc32
_LEGACY_FRAME = struct.Struct("<II")  # format 1: length, crc32 of the payload


@dataclass
class IngestResult:
    inserted: int = 0  # new documents, durable in the log and published by the next publish
    duplicates: int = 0  # documents the forest already held: only their files were recorded

    def __iadd__(self, other: IngestResult) -> IngestResult:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        return self


@dataclass
class LogContents:
    """What reading a log found."""

    rows: list[sspry_pb2.DocumentRow] = field(default_factory=list)
    corrupt: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes) skipped mid-log
    torn_tail: int = 0  # bytes after the last intact frame: a write cut short, never acknowledged
    format: int = LOG_FORMAT

    @property
    def skipped_bytes(self) -> int:
        return self.torn_tail + sum(len(span) for _, span in self.corrupt)


def _crc(length: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "little")))


def frame(row: sspry_pb2.DocumentRow) -> bytes:
    payload = row.SerializeToString()
    return _FRAME.pack(FRAME_MAGIC, len(payload), _crc(len(payload), payload)) + payload


class LogWriter:
    """Appends rows to one new log file. Not thread-safe: callers serialise appends."""

    def __init__(self, path: Path):
        self.path = path
        self.broken = False  # an append failed and could not be cut back: append no more here
        self.rows = 0
        self._out = diskio.OutFile(path, append=True, exclusive=True)
        try:
            self._out.write(_FILE_HEADER.pack(FILE_MAGIC, LOG_FORMAT))
            self._out.sync()
            kill_point("log.created")
            diskio.fsync_path(path.parent)
        except BaseException:
            self._out.close()
            diskio.remove(path)
            raise

    @property
    def bytes(self) -> int:
        return self._out.size

    def append(self, rows: Iterable[sspry_pb2.DocumentRow]) -> int:
        """Append rows and make them durable; returns how many were written. On failure the log is as it
        was before the call (or `broken`), and the error is raised."""
        data = [frame(row) for row in rows]
        blob = b"".join(data)
        start = self._out.size
        try:
            kill_point("log.append.start")
            half = len(blob) // 2
            self._out.write(blob[:half])
            kill_point("log.append.torn")  # killed here: a torn frame at the end of the log
            self._out.write(blob[half:])
            kill_point("log.append.written")
            self._out.sync()
        except BaseException:
            self._cut_back(start)
            raise
        kill_point("log.append.synced")
        self.rows += len(data)
        return len(data)

    def _cut_back(self, size: int) -> None:
        try:
            self._out.truncate(size)
            self._out.sync()
        except OSError:
            self.broken = True

    def close(self) -> None:
        self._out.close()


def write_log(path: Path, rows: Iterable[sspry_pb2.DocumentRow]) -> None:
    """A complete log file holding `rows` (the quarantine keeps its rows so)."""
    writer = LogWriter(path)
    try:
        writer.append(rows)
    finally:
        writer.close()


def _frame_at(data: bytes, at: int) -> tuple[sspry_pb2.DocumentRow, int] | None:
    """The row of an intact frame starting at `at` and where the next frame starts, or None."""
    if at + _FRAME.size > len(data):
        return None
    magic, length, crc = _FRAME.unpack_from(data, at)
    start = at + _FRAME.size
    if magic != FRAME_MAGIC or start + length > len(data):
        return None
    payload = data[start : start + length]
    if _crc(length, payload) != crc:
        return None
    row = sspry_pb2.DocumentRow()
    try:
        row.ParseFromString(payload)
    except DecodeError:
        return None
    return row, start + length


def read_log(path: Path) -> LogContents:
    """Every intact row of a log, and what was skipped. Raises ForestError for a log of another format."""
    data = path.read_bytes()
    if not data.startswith(FILE_MAGIC):
        if FILE_MAGIC.startswith(data[: len(FILE_MAGIC)]) and len(data) < _FILE_HEADER.size:
            return LogContents(torn_tail=len(data))  # created, header never completed: holds nothing
        return _read_format_1(data)
    if len(data) < _FILE_HEADER.size:
        return LogContents(torn_tail=len(data))
    _, version = _FILE_HEADER.unpack_from(data)
    if version != LOG_FORMAT:
        raise format_error(path, "ingest log", version, LOG_FORMAT)
    contents = LogContents()
    at = _FILE_HEADER.size
    while at < len(data):
        found = _frame_at(data, at)
        if found is not None:
            contents.rows.append(found[0])
            at = found[1]
            continue
        resume = data.find(FRAME_MAGIC, at + 1)
        while resume >= 0 and _frame_at(data, resume) is None:
            resume = data.find(FRAME_MAGIC, resume + 1)
        if resume < 0:
            contents.torn_tail = len(data) - at
            break
        contents.corrupt.append((at, data[at:resume]))
        at = resume
    return contents


def _read_format_1(data: bytes) -> LogContents:
    """A log written before format 2: frames without magic, so reading stops at the first bad one."""
    contents = LogContents(format=1)
    at = 0
    while at + _LEGACY_FRAME.size <= len(data):
        length, crc = _LEGACY_FRAME.unpack_from(data, at)
        start = at + _LEGACY_FRAME.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        row = sspry_pb2.DocumentRow()
        try:
            row.ParseFromString(payload)
        except DecodeError:
            break
        contents.rows.append(row)
        at = start + length
    contents.torn_tail = len(data) - at
    return contents
