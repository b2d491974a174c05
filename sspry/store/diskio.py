"""The file layer: every byte the store writes goes through here, and every entry it creates is durable.

Invariants kept here, and only here:
  * a file is fsynced before it is renamed into place or reported written;
  * a directory is fsynced after an entry is created in it or renamed into it (a new log, a segment
    directory, a tombstone, the manifest), so the entry survives a power loss;
  * files that are built in several steps (segments, tombstones, the manifest) are written under a
    fresh temporary name (TEMP_PREFIX) and renamed into place complete: a final name never holds a
    partial file, and a failed attempt never leaves a name a retry would collide with.

Writes go straight to the file descriptor (no buffer of ours): a write that fails leaves nothing queued
to reach the file later, so a caller that cuts a file back after a failure knows what it holds.

Test hook (the disk-full injector): `fail_after(n)` lets the store write n more bytes, then makes every
write fail with ENOSPC, as a full disk does: the write that crosses the limit writes what fits first, so
frames are torn exactly as they would be. `free()` lifts it. For a process started by a test, the
environment variable SSPRY_FAULT_ENOSPC="bytes[:seconds]" sets it at start: the disk is full after
`bytes` bytes and, with `seconds`, is freed that long after the first failure. When it is unset (always,
outside the fault tests), the cost is one attribute test per write.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from sspry.store.filenames import TEMP_PREFIX

ENOSPC_ENV = "SSPRY_FAULT_ENOSPC"


class _DiskFull:
    """The injector's state: bytes the store may still write (None: no limit)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.remaining: int | None = None
        self.free_after_s: float | None = None
        self.full_since: float | None = None
        self.injected = 0  # writes failed so far (reported by the fault harness)

    def set(self, remaining: int | None, free_after_s: float | None = None) -> None:
        with self.lock:
            self.remaining, self.free_after_s, self.full_since = remaining, free_after_s, None

    def take(self, wanted: int) -> int:
        """How many of `wanted` bytes fit (all of them when no limit is set)."""
        if self.remaining is None:
            return wanted
        with self.lock:
            if self.remaining is None:
                return wanted
            now = time.monotonic()
            freed = self.full_since is not None and self.free_after_s is not None
            if freed and now - self.full_since >= self.free_after_s:
                self.remaining = None
                return wanted
            allowed = min(wanted, self.remaining)
            self.remaining -= allowed
            if allowed < wanted:
                self.injected += 1
                if self.full_since is None:
                    self.full_since = now
            return allowed


_disk = _DiskFull()


def _from_environment() -> None:
    spec = os.environ.get(ENOSPC_ENV)
    if spec:
        after, _, seconds = spec.partition(":")
        _disk.set(int(after), float(seconds) if seconds else None)


_from_environment()


def fail_after(nbytes: int, free_after_s: float | None = None) -> None:
    """Test hook: the disk is full once the store has written `nbytes` more bytes."""
    _disk.set(nbytes, free_after_s)


def free() -> None:
    """Test hook: lift `fail_after`."""
    _disk.set(None)


def remaining() -> int | None:
    """Test hook: bytes the store may still write before `fail_after` fails them (None: no limit)."""
    return _disk.remaining


def injected_failures() -> int:
    """Test hook: how many writes the injector has failed in this process."""
    return _disk.injected


def _full(path: Path | str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def charge(nbytes: int, what: Path | str) -> None:
    """Account for `nbytes` written outside this module (SQLite's pages): fails with ENOSPC, writing
    nothing, when the injector says they do not fit."""
    if _disk.take(nbytes) < nbytes:
        raise _full(what)


def _need_entry(path: Path) -> None:
    """Creating a directory entry needs space too (the injector counts it as one byte)."""
    if _disk.take(1) < 1:
        raise _full(path)


class OutFile:
    """A file the store writes. `write` goes through the injector; nothing is buffered here."""

    def __init__(self, path: Path, *, append: bool = False, exclusive: bool = False):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if append else os.O_TRUNC
        if exclusive:
            flags |= os.O_EXCL
        _need_entry(self.path)
        self.fd = os.open(self.path, flags, 0o644)
        self.size = os.fstat(self.fd).st_size

    def write(self, data) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        allowed = _disk.take(len(view))
        done = 0
        while done < allowed:
            done += os.write(self.fd, view[done:allowed])
        self.size += done
        if allowed < len(view):
            raise _full(self.path)
        return len(view)

    def tell(self) -> int:
        return self.size

    def sync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create `path` and any missing parents, each made durable in its parent."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        _need_entry(directory)
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_path(directory.parent)


def temp_name(final: Path) -> Path:
    """A fresh name beside `final` to build it under (never the same twice)."""
    return final.with_name(f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}")


def rename_into_place(source: Path, final: Path) -> None:
    """Rename a complete, fsynced file or directory to its final name, durably. A directory is never
    renamed over an existing one."""
    os.rename(source, final)
    fsync_path(final.parent)


def write_file(path: Path, data: bytes) -> None:
    """Write a whole new file and fsync it (its directory entry is the caller's to make durable)."""
    with OutFile(path, exclusive=True) as out:
        out.write(data)
        out.sync()


def save_array(path: Path, array) -> None:
    """np.save, through this layer, fsynced."""
    import numpy as np

    with OutFile(path, exclusive=True) as out:
        np.save(out, array)
        out.sync()


def atomic_write(path: Path, data: bytes, point: str = "replace") -> None:
    """Replace `path` with `data` all at once: write a fresh temporary file, fsync, rename, fsync the
    directory. A failure leaves `path` as it was and removes the temporary file. `point` names the
    kill points passed on the way (`<point>.synced`, `<point>.renamed`)."""
    from sspry.store.killpoints import kill_point

    tmp = temp_name(path)
    try:
        with OutFile(tmp, exclusive=True) as out:
            out.write(data)
            out.sync()
        kill_point(f"{point}.synced")
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    kill_point(f"{point}.renamed")
    fsync_path(path.parent)


def remove(path: Path) -> None:
    """Remove a file or a directory tree if it is there; best effort (cleaning up after a failure must
    not hide the failure)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass
