"""Protobuf conversions the client and the server share (messages only: no grpc here).

Rows travel as serialized `DocumentRow`s cut into `InsertFrame` chunks, so a row bigger than the message
limit (the blooms of a large file) still fits; `RowAssembler` puts them back together and refuses
anything malformed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from google.protobuf.message import DecodeError

from sspry.document import PATH_KEY_BYTES, Document, path_key
from sspry.policy import POLICY_VERSION, Policy, PolicyError
from sspry.store.files import FileRecord
from sspry.v1 import sspry_pb2

FRAME_OVERHEAD = 64  # bytes a frame adds around its chunk, generously
FRAME_BYTES = 1 << 20  # row bytes per insert frame


class WireError(ValueError):
    """A malformed message from the other side."""


def policy_to_proto(policy: Policy) -> sspry_pb2.Policy:
    return sspry_pb2.Policy(
        id_source=policy.id_source,
        tier1_gram=policy.gram_sizes[0],
        tier2_gram=policy.gram_sizes[1],
        tier1_fp=policy.tier1_fp,
        tier2_fp=policy.tier2_fp,
        store_path=policy.store_path,
        shards=policy.shards,
        tree_docs=policy.tree_docs,
        ladder_steps=policy.ladder_steps,
        prefix_bytes=policy.prefix_bytes,
        fold_case=policy.fold_case,
        version=policy.version,
    )


def _version_problem(version: int, whose: str) -> str | None:
    """Why rows or a forest of policy `version` cannot be used here (blooms of another gram hash would
    make searches miss files silently), or None."""
    if version == POLICY_VERSION:
        return None
    shown = version if version else f"before {POLICY_VERSION}"
    return (
        f"{whose} of policy version {shown}, this sspry reads {POLICY_VERSION}: "
        "run the same sspry version on clients and servers"
    )


def policy_from_proto(message: sspry_pb2.Policy) -> Policy:
    """A server's policy; PolicyError when its forest is of another version than this sspry's."""
    problem = _version_problem(message.version, "the server's forest is")
    if problem:
        raise PolicyError(problem)
    return Policy(
        id_source=message.id_source,
        gram_sizes=(message.tier1_gram, message.tier2_gram),
        tier1_fp=message.tier1_fp,
        tier2_fp=message.tier2_fp,
        store_path=message.store_path,
        shards=message.shards,
        tree_docs=message.tree_docs,
        ladder_steps=message.ladder_steps,
        prefix_bytes=message.prefix_bytes,
        fold_case=message.fold_case,
    )


_EXTERNAL_FIELDS = ((bool, "boolean"), (int, "integer"), (float, "real"), (str, "text"))  # bool first


def externals_to_proto(externals: Mapping[str, bool | int | float | str]) -> dict[str, sspry_pb2.External]:
    out = {}
    for name, value in externals.items():
        field = next(f for kind, f in _EXTERNAL_FIELDS if isinstance(value, kind))
        out[name] = sspry_pb2.External(**{field: value})
    return out


def externals_from_proto(message: Mapping[str, sspry_pb2.External]) -> dict[str, bool | int | float | str]:
    """The values of a request's externals; WireError for one without a value or a bad name."""
    out: dict[str, bool | int | float | str] = {}
    for name, external in message.items():
        field = external.WhichOneof("value")
        if field is None or not name.isidentifier() or not name.isascii():
            raise WireError(f"external variable {name!r} has no value or is not a YARA identifier")
        out[name] = getattr(external, field)
    return out


Namespace = tuple[str, str | None, list[str]]  # (YARA namespace, source or None, target rules)


def namespaces_to_proto(namespaces: Iterable[Namespace]) -> dict:
    """A search's rules as SearchRequest fields: one namespace as `source` and `targets` (what servers
    that predate namespaces read), several as `namespaces`."""
    found = list(namespaces)
    if len(found) == 1:
        _, source, targets = found[0]
        return {"source": source or "", "targets": targets}
    return {
        "namespaces": [
            sspry_pb2.RuleNamespace(name=name, source=source or "", targets=targets)
            for name, source, targets in found
        ]
    }


def namespaces_from_proto(request: sspry_pb2.SearchRequest) -> list[Namespace]:
    """A request's namespaces (one, "default", when it has none); WireError for a nameless or repeated
    namespace. A source is empty when yaramod could not parse it on the client: every rule of it then
    plans as TRUE."""
    if not request.namespaces:
        return [("default", request.source or None, list(request.targets))]
    names = [ns.name for ns in request.namespaces]
    if not all(names) or len(set(names)) != len(names):
        raise WireError("namespaces must be named, each name once")
    return [(ns.name, ns.source or None, list(ns.targets)) for ns in request.namespaces]


def file_stamp(doc: Document) -> sspry_pb2.FileStamp:
    """Where a document was read, without its content (the path only if the document carries it)."""
    stamp = sspry_pb2.FileStamp(path_key=doc.path_key, size=doc.filesize, mtime_ns=doc.mtime_ns)
    if doc.path is not None:
        stamp.path = doc.path
    return stamp


def file_record(stamp: sspry_pb2.FileStamp, source_id: bytes, policy: Policy) -> FileRecord:
    """A received stamp as a catalog record; WireError when it is malformed."""
    if len(stamp.path_key) != PATH_KEY_BYTES:
        raise WireError(f"path key of {len(stamp.path_key)} bytes, {PATH_KEY_BYTES} expected")
    path = stamp.path if stamp.HasField("path") else None
    if path is not None and path_key(path) != stamp.path_key:
        raise WireError("path key does not match the path")
    return FileRecord(
        bytes(stamp.path_key), path if policy.store_path else None, source_id, stamp.size, stamp.mtime_ns
    )


def row_frames(
    rows: Iterable[sspry_pb2.DocumentRow], max_message_bytes: int
) -> Iterator[sspry_pb2.InsertFrame]:
    """Each row serialized and cut into frames of at most FRAME_BYTES that fit `max_message_bytes`: small
    frames keep the copies a server makes of a message in flight small, so its insert budget bounds its
    memory."""
    chunk = max(1024, min(FRAME_BYTES, max_message_bytes - FRAME_OVERHEAD))
    for row in rows:
        data = row.SerializeToString()
        for start in range(0, max(len(data), 1), chunk):
            end = start + chunk
            yield sspry_pb2.InsertFrame(
                chunk=data[start:end], row_end=end >= len(data), version=POLICY_VERSION
            )


class RowAssembler:
    """Collects InsertFrames back into DocumentRows, bounded in total size."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.rows: list[sspry_pb2.DocumentRow] = []
        self.bytes = 0
        self._pending: list[bytes] = []

    def add(self, frame: sspry_pb2.InsertFrame) -> None:
        problem = _version_problem(frame.version, "rows built by an sspry")
        if problem:
            raise WireError(problem)
        self.bytes += len(frame.chunk)
        if self.bytes > self.max_bytes:
            raise WireError(f"insert call larger than {self.max_bytes} bytes: send smaller batches")
        self._pending.append(frame.chunk)
        if frame.row_end:
            row = sspry_pb2.DocumentRow()
            try:
                row.ParseFromString(b"".join(self._pending))
            except DecodeError as exc:
                raise WireError(f"row {len(self.rows) + 1} is not a valid DocumentRow: {exc}") from exc
            self._pending = []
            self.rows.append(row)

    def finish(self) -> list[sspry_pb2.DocumentRow]:
        if self._pending:
            raise WireError(f"the stream ended inside row {len(self.rows) + 1} (no row_end frame)")
        return self.rows
