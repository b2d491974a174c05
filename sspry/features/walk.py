"""Finding the files to index or scan: paths walked recursively (or read from path lists) into regular
files with their size and mtime. No compiled code here, so scan mode and clients start fast."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass


class SkippedFile(Exception):
    """A file that could not be indexed (unreadable, vanished, changed while read); the run goes on."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute
    size: int
    mtime_ns: int


@dataclass
class WalkResult:
    files: list[FoundFile]
    problems: list[SkippedFile]

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def walk(paths: Iterable[str], path_list: bool = False) -> WalkResult:
    """Expand PATHS (files, directories walked recursively, or with `path_list` manifests of paths)
    into a sorted, de-duplicated list of regular files with their size and mtime, collecting what could
    not be read instead of failing. FIFOs, devices and sockets inside directories are passed over."""
    files: dict[str, FoundFile] = {}
    problems: list[SkippedFile] = []
    roots: list[str] = []
    for given in paths:
        if not path_list:
            roots.append(given)
            continue
        try:
            with open(given, encoding="utf-8", errors="surrogateescape") as manifest:
                base = os.path.dirname(os.path.abspath(given))
                for line in manifest:
                    entry = line.rstrip("\r\n")
                    if entry.strip():
                        roots.append(entry if os.path.isabs(entry) else os.path.join(base, entry))
        except OSError as exc:
            problems.append(SkippedFile(given, f"cannot read path list: {exc.strerror}"))

    def on_error(exc: OSError) -> None:
        problems.append(SkippedFile(exc.filename or "?", exc.strerror or str(exc)))

    def add(path: str, info: os.stat_result) -> None:
        path = os.path.abspath(path)
        files[path] = FoundFile(path, info.st_size, info.st_mtime_ns)

    for root in roots:
        try:
            info = os.stat(root)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError) and not os.path.lexists(root)
            problems.append(SkippedFile(root, "no such file or directory" if missing else exc.strerror))
            continue
        if stat.S_ISDIR(info.st_mode):
            for directory, subdirs, names in os.walk(root, onerror=on_error):
                subdirs.sort()
                for name in names:
                    full = os.path.join(directory, name)
                    try:
                        found = os.stat(full)
                    except OSError:
                        continue  # a dangling link, or gone since the listing
                    if stat.S_ISREG(found.st_mode):
                        add(full, found)
        elif stat.S_ISREG(info.st_mode):
            add(root, info)
        else:
            problems.append(SkippedFile(root, "not a regular file or directory"))
    return WalkResult([files[p] for p in sorted(files)], problems)
