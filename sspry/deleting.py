"""Deleting by VALUE, one rule for a local Forest and for servers.

A VALUE is read as:
  * a Source ID: hex of the policy's length (and no file of that name) deletes that document with
    every path recorded for it;
  * otherwise a path (made canonical): that one file is forgotten, and its document is deleted only when
    no other recorded path is left (the same content indexed from two paths stays searchable from the
    other);
  * a path that was never recorded but is an existing file: the document with that file's content.

Anything else is reported `missing`, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sspry.policy import Policy
from sspry.store.files import PathDeletion

if TYPE_CHECKING:
    from sspry.store.forest import Forest

STATUSES = ("deleted", "path-removed", "missing")


class DeleteBackend(Protocol):
    """Where documents are deleted: a Forest (`ForestDeleter`) or servers (`client.cluster`). A place
    is a server address ("" for a local Forest)."""

    policy: Policy

    def delete_ids(self, source_ids: list[bytes]) -> list[list[str]]:
        """Per Source ID, the places that deleted it."""
        ...

    def delete_paths(self, paths: list[str]) -> list[list[tuple[str, PathDeletion]]]:
        """Per path, (place, what happened) for each place that had it recorded."""
        ...


class ForestDeleter:
    def __init__(self, forest: Forest):
        self.forest = forest
        self.policy = forest.policy

    def delete_ids(self, source_ids: list[bytes]) -> list[list[str]]:
        return [[""] if done else [] for done in self.forest.delete(source_ids)] if source_ids else []

    def delete_paths(self, paths: list[str]) -> list[list[tuple[str, PathDeletion]]]:
        found = self.forest.delete_paths(paths) if paths else []
        return [[("", d)] if d.source_id is not None else [] for d in found]


@dataclass
class Deletion:
    """What happened to one VALUE."""

    value: str
    status: str  # one of STATUSES
    identity: str | None = None  # the Source ID (hex) it named
    remaining_paths: int | None = None  # with status path-removed: paths the document still has
    servers: list[str] = field(default_factory=list)  # where it happened (remote deletes)
    reason: str | None = None  # why it is missing, or how a path was read

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []}


def _content_id(path: str, policy: Policy) -> bytes:
    hasher = policy.new_id_hasher()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            hasher.update(block)
    return hasher.digest()


def _source_id(value: str, policy: Policy) -> bytes | None:
    if len(value) != 2 * policy.id_bytes or os.path.lexists(value):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def delete_values(backend: DeleteBackend, values: list[str]) -> list[Deletion]:
    """Delete each VALUE (see the module docstring); one Deletion per value, in order."""
    policy = backend.policy
    ids = {v: i for v in values if (i := _source_id(v, policy)) is not None}
    paths = {v: os.path.realpath(v) for v in values if v not in ids}
    by_id = dict(zip(ids, backend.delete_ids(list(ids.values())), strict=True))
    by_path = dict(zip(paths, backend.delete_paths(list(paths.values())), strict=True))
    # paths never recorded that are files: delete by content, as the original did
    contents: dict[str, bytes] = {}
    for value in paths:
        if not by_path[value] and os.path.isfile(value):
            with contextlib.suppress(OSError):  # unreadable: reported missing
                contents[value] = _content_id(value, policy)
    by_content = dict(zip(contents, backend.delete_ids(list(contents.values())), strict=True))

    out = []
    for value in values:
        if value in ids:
            places = by_id[value]
            status = "deleted" if places else "missing"
            reason = None if places else "no document with this Source ID"
            out.append(Deletion(value, status, ids[value].hex(), servers=_named(places), reason=reason))
        elif by_path[value]:
            found = by_path[value]
            gone = [place for place, d in found if d.document_deleted]
            first = found[0][1]
            assert first.source_id is not None
            out.append(
                Deletion(
                    value,
                    "deleted" if gone else "path-removed",
                    first.source_id.hex(),
                    remaining_paths=None if gone else max(d.remaining_paths for _, d in found),
                    servers=_named(place for place, _ in found),
                )
            )
        elif value in contents:
            places = by_content[value]
            out.append(
                Deletion(
                    value,
                    "deleted" if places else "missing",
                    contents[value].hex(),
                    servers=_named(places),
                    reason="path not recorded: deleted by content"
                    if places
                    else "path not recorded, and this file's content is not indexed",
                )
            )
        else:
            out.append(Deletion(value, "missing", reason=_why_missing(value, policy)))
    return out


def _named(places) -> list[str]:
    """Server addresses (a local Forest's place has no name)."""
    return [place for place in places if place]


def _why_missing(value: str, policy: Policy) -> str:
    digits = 2 * policy.id_bytes
    if value and all(c in string.hexdigits for c in value):
        return (
            f"not a {policy.id_source} Source ID ({digits} hex digits, this is {len(value)}), "
            "and no file or recorded path of that name"
        )
    return "no recorded path and no such file"
