"""What the store raises: a Forest that cannot be opened or written as asked, and the one failure a caller
should treat differently from the others, a full disk (StorageFull: retry once space is freed; a server
maps it to RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"


class ForestError(Exception):
    """A Forest that cannot be opened or written as asked (not initialised, locked, of another format)."""


class StorageFull(ForestError):
    """The disk or the quota is full. Nothing of the failed call was acknowledged, and nothing acknowledged
    before it is lost; the same call succeeds once space is freed, without a restart."""


def format_error(path: Path, what: str, found: object, reads: int) -> ForestError:
    """One line naming both versions, for a file this sspry does not read."""
    return ForestError(f"{path}: {what} format {found}, this sspry reads format {reads}")


def is_full(exc: BaseException) -> bool:
    """Is this the disk (or quota) being full: an OSError, or SQLite's SQLITE_FULL?"""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    sqlite3 = sys.modules.get("sqlite3")  # never imported here: if it is not loaded, it raised nothing
    return (
        sqlite3 is not None
        and isinstance(exc, sqlite3.OperationalError)
        and getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL
    )


@contextlib.contextmanager
def full_disk_as(action: str) -> Iterator[None]:
    """Turn a full disk met inside the block into StorageFull("<action>: No space left on device")."""
    try:
        yield
    except StorageFull:
        raise
    except Exception as exc:
        if not is_full(exc):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "No space left on device"
        raise StorageFull(f"{action}: {reason}") from exc
