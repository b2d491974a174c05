"""A Document: one file's Source ID, its Tier 1 and Tier 2 blooms and its metadata sidecar.

The same structure travels from the extractor to the store (in process) or over the wire and into the
ingest log as a `sspry.v1.DocumentRow` protobuf message.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sspry.policy import BLOCK_BITS, Policy, PolicyError
from sspry.v1 import sspry_pb2

if TYPE_CHECKING:
    import numpy as np

ENTRY_BYTES = 16
MAX_FIELDS = 512
PATH_KEY_BYTES = 16


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

    @classmethod
    def from_row(cls, row: sspry_pb2.DocumentRow, policy: Policy) -> Document:
        """Decode and validate a row against the policy; raise PolicyError on anything malformed."""
        import numpy as np  # not at import: clients that never decode rows start without numpy

        from sspry.bloom import is_class

        if len(row.source_id) != policy.id_bytes:
            raise PolicyError(
                f"source id of {len(row.source_id)} bytes, but this forest uses {policy.id_source} "
                f"({policy.id_bytes} bytes)"
            )
        blooms = []
        for tier, bloom in ((1, row.tier1), (2, row.tier2)):
            size = len(bloom.bits)
            if (
                size == 0
                or size % (BLOCK_BITS // 8)
                or not is_class(size * 8 // BLOCK_BITS, policy.ladder_steps)
            ):
                raise PolicyError(f"tier {tier} bloom of {size} bytes is not a size class of this forest")
            blooms.append(np.frombuffer(bloom.bits, dtype=np.uint8))
        if len(row.prefix) > policy.prefix_bytes or len(row.prefix) > row.filesize:
            raise PolicyError(f"prefix of {len(row.prefix)} bytes is longer than allowed")
        if not 0.0 <= row.entropy <= 8.0:
            raise PolicyError(f"entropy {row.entropy} is outside [0, 8]")
        if len(row.entry_bytes) > ENTRY_BYTES:
            raise PolicyError(f"{len(row.entry_bytes)} entry-point bytes, at most {ENTRY_BYTES} allowed")
        if len(row.fields) > MAX_FIELDS or any(len(name) > 128 for name in row.fields):
            raise PolicyError("too many or too long metadata fields")
        path = row.path if row.HasField("path") else None
        if len(row.path_key) not in (0, PATH_KEY_BYTES):
            raise PolicyError(f"path key of {len(row.path_key)} bytes, {PATH_KEY_BYTES} expected")
        if path is not None and row.path_key != path_key(path):
            raise PolicyError("path key does not match the path")
        if path is not None and not policy.store_path:
            path = None
        return cls(
            source_id=bytes(row.source_id),
            filesize=row.filesize,
            tier1=blooms[0],
            tier2=blooms[1],
            tier1_estimate=row.tier1.estimate,
            tier2_estimate=row.tier2.estimate,
            entropy=row.entropy,
            prefix=bytes(row.prefix),
            path=path,
            fields=dict(row.fields),
            entry_bytes=bytes(row.entry_bytes),
            modules_scanned=row.modules_scanned,
            path_key=bytes(row.path_key),
            mtime_ns=row.mtime_ns,
        )


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
