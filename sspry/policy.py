"""The database-wide policy: fixed at `sspry init`, stored in the Forest root, enforced by every command.

Everything that decides how a document's blooms are built lives here, because the index side (client)
and the query side (server) must agree on it bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from sspry.limits import MAX_PREFIX_BYTES, MAX_TREE_DOCS

POLICY_VERSION = 2  # the format of sspry.json (its "version" field); 2: the gram hash of sspry/bloom.py
ID_SOURCES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
GRAM_PAIRS = ((3, 4), (4, 5), (5, 6), (7, 8))
FP_RANGE = (0.01, 0.5)
BLOCK_BITS = 512  # blooms are blocked: a gram's k probes fall in one 512-bit block (sspry/bloom.py)
DEFAULT_PREFIX_BYTES = 64


class PolicyError(ValueError):
    """An invalid policy value, or a command whose inputs disagree with the stored policy."""


def parse_gram_sizes(text: str) -> tuple[int, int]:
    """Parse `T1,T2` (for example `3,4`) into a supported gram-size pair."""
    try:
        pair = tuple(int(part) for part in text.split(","))
    except ValueError:
        pair = ()
    if pair not in GRAM_PAIRS:
        choices = " ".join(f"{a},{b}" for a, b in GRAM_PAIRS)
        raise PolicyError(f"invalid gram sizes {text!r}: choose one of {choices}")
    return pair  # type: ignore[return-value]


def hashes_for_fp(fp: float) -> int:
    """Number of bloom probes per gram for a tier's target false-positive rate (fixed per tier)."""
    return max(1, round(math.log2(1.0 / fp)))


def bits_per_gram(fp: float) -> float:
    """Bloom bits per distinct gram that give `fp` with the tier's fixed probe count k."""
    k = hashes_for_fp(fp)
    return -k / math.log(1.0 - fp ** (1.0 / k))


@dataclass(frozen=True)
class Policy:
    id_source: str = "sha256"
    gram_sizes: tuple[int, int] = (3, 4)
    tier1_fp: float = 0.4
    tier2_fp: float = 0.25
    store_path: bool = False
    shards: int = 8
    tree_docs: int = 250_000
    ladder_steps: int = 8
    prefix_bytes: int = DEFAULT_PREFIX_BYTES
    # Tier 1 also indexes each gram with ASCII capitals lowercased, so a nocase window costs one gram
    # there. Tier 1 only: 3-grams are few (at most 2**24), Tier 2 holds most of the bytes.
    fold_case: bool = True
    version: int = field(default=POLICY_VERSION)

    def __post_init__(self) -> None:
        if self.id_source not in ID_SOURCES:
            raise PolicyError(f"invalid id source {self.id_source!r}: choose one of {', '.join(ID_SOURCES)}")
        if tuple(self.gram_sizes) not in GRAM_PAIRS:
            raise PolicyError(f"invalid gram sizes {self.gram_sizes}")
        for name in ("tier1_fp", "tier2_fp"):
            value = getattr(self, name)
            if not (FP_RANGE[0] <= value <= FP_RANGE[1]):
                raise PolicyError(f"invalid {name.replace('_', '-')}-set-fp {value}: must be in [0.01, 0.5]")
        if not 1 <= self.shards <= 256:
            raise PolicyError(f"invalid shard count {self.shards}: must be in [1, 256]")
        if not 1 <= self.tree_docs <= MAX_TREE_DOCS:
            raise PolicyError(
                f"invalid tree size {self.tree_docs}: must be in [1, {MAX_TREE_DOCS}] (MAX_TREE_DOCS)"
            )
        if not 0 <= self.prefix_bytes <= MAX_PREFIX_BYTES:
            raise PolicyError(
                f"invalid prefix size {self.prefix_bytes}: must be in [0, {MAX_PREFIX_BYTES}] "
                "(MAX_PREFIX_BYTES)"
            )
        if not 1 <= self.ladder_steps <= 64:
            raise PolicyError(f"invalid ladder steps {self.ladder_steps}: must be in [1, 64]")
        if self.version != POLICY_VERSION:
            raise PolicyError(
                f"unsupported policy version {self.version} (this sspry reads {POLICY_VERSION})"
            )

    @property
    def id_bytes(self) -> int:
        return ID_SOURCES[self.id_source]

    def tier_gram(self, tier: int) -> int:
        return self.gram_sizes[tier - 1]

    def tier_fp(self, tier: int) -> float:
        return self.tier1_fp if tier == 1 else self.tier2_fp

    def tier_k(self, tier: int) -> int:
        return hashes_for_fp(self.tier_fp(tier))

    def new_id_hasher(self) -> hashlib._Hash:
        return hashlib.new(self.id_source)

    def to_json(self) -> str:
        data = asdict(self)
        data["gram_sizes"] = list(self.gram_sizes)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        data["gram_sizes"] = tuple(data["gram_sizes"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"policy has unknown fields {sorted(unknown)}: written by a newer sspry?")
        return cls(**data)

    def describe(self) -> dict:
        """The policy as printed by `init` and `info`."""
        return {
            "id_source": self.id_source,
            "gram_sizes": f"{self.gram_sizes[0]},{self.gram_sizes[1]}",
            "tier1_set_fp": self.tier1_fp,
            "tier2_set_fp": self.tier2_fp,
            "tier1_hashes": self.tier_k(1),
            "tier2_hashes": self.tier_k(2),
            "store_path": self.store_path,
            "shards": self.shards,
            "tree_docs": self.tree_docs,
            "ladder_steps": self.ladder_steps,
            "prefix_bytes": self.prefix_bytes,
            "fold_case": self.fold_case,
        }
