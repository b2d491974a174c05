"""A Document: one file's Source ID, its Tier 1 and Tier 2 blooms and its metadata sidecar.

The same structure travels from the extractor to the store (in process) or over the wire and into the
ingest log as a `sspry.v1.DocumentRow` protobuf message.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sspry import limits
from sspry.limits import ENTRY_BYTES
from sspry.policy import BLOCK_BITS, Policy, PolicyError
from sspry.v1 import sspry_pb2

if TYPE_CHECKING:
    import numpy as np

PATH_KEY_BYTES = 16
ROW_OVERHEAD_BYTES = 256  # a row's fixed-size fields and framing, for `row_bytes`


def _over(what: str, value: int, name: str) -> PolicyError:
    return PolicyError(f"{what}: {value}, over the limit of {getattr(limits, name)} ({name})")


# A file rewritten within one tick of the clock that stamps it keeps its mtime (a jiffy on Linux, 2 s on
# FAT), so a stamp this close to the reading proves nothing later: such a file is recorded with its mtime
# unknown (-1), as git treats its "racily clean" entries.
RACY_NS = 2_000_000_000
UNKNOWN_STAMP = (0, -1)  # the (size, mtime_ns) of a path whose stamp is not known


def settled_mtime(mtime_ns: int, read_end_ns: int) -> int:
    """The mtime to record for a file read until `read_end_ns` (time.time_ns()): -1 when it is racy."""
    return mtime_ns if mtime_ns < read_end_ns - RACY_NS else -1


def paired_stamps(paths: Sequence[str], stamps: Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    """`stamps` when there is one per path, else UNKNOWN_STAMP for each path (so none is trusted): what
    an older server, or a caller without stamps, gives."""
    return stamps if len(stamps) == len(paths) else [UNKNOWN_STAMP] * len(paths)


def unchanged(recorded: tuple[int, int], size: int, mtime_ns: int) -> bool:
    """Whether a file that now has `size` and `mtime_ns` still holds the document indexed from it, by
    its recorded (size, mtime_ns) stamp: re-indexing does not read it again, verification scans it
    without hashing it. A stamp with its mtime unknown (-1) never holds."""
    return recorded[1] >= 0 and recorded == (size, mtime_ns)


def path_key(path: str) -> bytes:
    """The key a file is recorded under: blake2b-128 of its canonical path. Recorded for every forest,
    also those that do not store paths, so that a re-run recognises files it has already indexed."""
    return hashlib.blake2b(os.fsencode(path), digest_size=PATH_KEY_BYTES).digest()


@dataclass(eq=False)
class Document:
    source_id: bytes
    filesize: int
    tier1: np.ndarray  # uint8 bloom bytes, a multiple of 64
    tier2: np.ndarray
    tier1_estimate: int
    tier2_estimate: int
    entropy: float
    prefix: bytes
    path: str | None = None
    fields: dict[str, int] = field(default_factory=dict)
    entry_bytes: bytes = b""
    modules_scanned: bool = False
    path_key: bytes = b""  # where the file was read (see path_key()); b"": not recorded
    mtime_ns: int = -1  # its modification time then

    def bloom(self, tier: int) -> np.ndarray:
        return self.tier1 if tier == 1 else self.tier2

    def blocks(self, tier: int) -> int:
        return len(self.bloom(tier)) * 8 // BLOCK_BITS

    def to_row(self) -> sspry_pb2.DocumentRow:
        row = sspry_pb2.DocumentRow(
            source_id=self.source_id,
            filesize=self.filesize,
            tier1=sspry_pb2.Bloom(estimate=self.tier1_estimate, bits=self.tier1.tobytes()),
            tier2=sspry_pb2.Bloom(estimate=self.tier2_estimate, bits=self.tier2.tobytes()),
            entropy=self.entropy,
            prefix=self.prefix,
            fields=self.fields,
            entry_bytes=self.entry_bytes,
            modules_scanned=self.modules_scanned,
            path_key=self.path_key,
            mtime_ns=self.mtime_ns,
        )
        if self.path is not None:
            row.path = self.path
        return row

    def row_bytes(self) -> int:
        """The size of this document as a row, from above (what the row limit counts)."""
        return (
            len(self.tier1)
            + len(self.tier2)
            + len(self.source_id)
            + len(self.prefix)
            + len(self.entry_bytes)
            + len(self.path_key)
            + (len(self.path.encode("utf-8", "surrogateescape")) if self.path is not None else 0)
            + sum(len(name) + 16 for name in self.fields)
            + ROW_OVERHEAD_BYTES
        )

    def check(self, policy: Policy) -> None:
        """Raise PolicyError unless the document fits the policy and every limit of `sspry.limits`: what
        passes here can always be published."""
        from sspry.bloom import is_class  # numpy: not for clients at import
        from sspry.features.sizing import bloom_blocks

        if len(self.source_id) != policy.id_bytes:
            raise PolicyError(
                f"source id of {len(self.source_id)} bytes, but this forest uses {policy.id_source} "
                f"({policy.id_bytes} bytes)"
            )
        for tier in (1, 2):
            size = len(self.bloom(tier))
            blocks = size * 8 // BLOCK_BITS
            if size == 0 or size % (BLOCK_BITS // 8) or not is_class(blocks, policy.ladder_steps):
                raise PolicyError(f"tier {tier} bloom of {size} bytes is not a size class of this forest")
            estimate = self.tier1_estimate if tier == 1 else self.tier2_estimate
            expected = bloom_blocks(estimate, policy, tier)
            if blocks != expected:
                raise PolicyError(
                    f"tier {tier} bloom of {blocks} blocks does not fit its estimate of {estimate} grams: "
                    f"this forest's policy sizes it at {expected} blocks"
                )
        if len(self.prefix) > policy.prefix_bytes or len(self.prefix) > self.filesize:
            raise PolicyError(f"prefix of {len(self.prefix)} bytes is longer than allowed")
        if not 0.0 <= self.entropy <= 8.0:
            raise PolicyError(f"entropy {self.entropy} is outside [0, 8]")
        if len(self.entry_bytes) > ENTRY_BYTES:
            raise _over("entry-point bytes", len(self.entry_bytes), "ENTRY_BYTES")
        if len(self.fields) > limits.MAX_FIELDS_PER_ROW:
            raise _over("module fields in one row", len(self.fields), "MAX_FIELDS_PER_ROW")
        for name in self.fields:
            if len(name.encode()) > limits.MAX_FIELD_NAME_BYTES:
                raise _over("bytes in a module field name", len(name.encode()), "MAX_FIELD_NAME_BYTES")
            if not limits.FIELD_NAME.fullmatch(name):
                raise PolicyError(f"module field name {name!r} is not a dotted YARA identifier (FIELD_NAME)")
        if len(self.path_key) not in (0, PATH_KEY_BYTES):
            raise PolicyError(f"path key of {len(self.path_key)} bytes, {PATH_KEY_BYTES} expected")
        if self.path is not None:
            try:
                encoded = self.path.encode("utf-8")
            except UnicodeEncodeError:
                raise PolicyError(f"path {self.path!r} is not valid UTF-8 and cannot be stored") from None
            if len(encoded) > limits.MAX_PATH_BYTES:
                raise _over("path bytes", len(encoded), "MAX_PATH_BYTES")
            if self.path_key != path_key(self.path):
                raise PolicyError("path key does not match the path")
        if self.row_bytes() > limits.MAX_ROW_BYTES:
            raise _over("row bytes", self.row_bytes(), "MAX_ROW_BYTES")

    @classmethod
    def from_row(cls, row: sspry_pb2.DocumentRow, policy: Policy) -> Document:
        """Decode and validate a row against the policy; raise PolicyError on anything malformed."""
        import numpy as np  # not at import: clients that never decode rows start without numpy

        doc = cls(
            source_id=bytes(row.source_id),
            filesize=row.filesize,
            tier1=np.frombuffer(row.tier1.bits, dtype=np.uint8),
            tier2=np.frombuffer(row.tier2.bits, dtype=np.uint8),
            tier1_estimate=row.tier1.estimate,
            tier2_estimate=row.tier2.estimate,
            entropy=row.entropy,
            prefix=bytes(row.prefix),
            path=row.path if row.HasField("path") else None,
            fields=dict(row.fields),
            entry_bytes=bytes(row.entry_bytes),
            modules_scanned=row.modules_scanned,
            path_key=bytes(row.path_key),
            mtime_ns=row.mtime_ns,
        )
        doc.check(policy)
        if not policy.store_path:
            doc.path = None
        return doc


def resolve_value(value: str, policy: Policy) -> bytes | str:
    """What a delete VALUE names: an existing file is hashed into its Source ID, hex of the right length
    is a Source ID, and otherwise (with stored paths) it is a path to look up among stored paths.
    Raises ValueError for anything else."""
    if os.path.isfile(value):
        hasher = policy.new_id_hasher()
        with open(value, "rb") as handle:
            for block in iter(lambda: handle.read(16 << 20), b""):
                hasher.update(block)
        return hasher.digest()
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) == policy.id_bytes:
        return raw
    if policy.store_path:
        return os.path.realpath(value)
    digits = 2 * policy.id_bytes
    raise ValueError(
        f"{value!r} is neither an existing file nor a {policy.id_source} Source ID ({digits} hex digits)"
    )
