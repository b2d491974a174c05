"""Which segments of a shard to merge: size-tiered, as an LSM tree does.

Small publishes create small segments; a search visits every segment, so many small ones cost time.
Segments are grouped in tiers by live size (powers of FANOUT); when a tier holds FANOUT segments they are
merged into one of the next tier, so a shard holds O(FANOUT * log(docs)) segments and each document is
rewritten O(log(docs)) times. A segment whose deleted share passes DELETED_SHARE is rewritten so the
space comes back.
"""

from __future__ import annotations

import math

from sspry.store.manifest import SegmentEntry

FANOUT = 4
DELETED_SHARE = 0.2


def _tier(entry: SegmentEntry) -> int:
    return int(math.log(max(entry.live, 1), FANOUT))


def plan_shard(segments: list[SegmentEntry], full: bool) -> list[list[SegmentEntry]]:
    """Groups of segments to rewrite, each into one new segment (fully deleted ones into none)."""
    if full:
        if len(segments) > 1 or any(e.deleted for e in segments):
            return [list(segments)]
        return []
    groups: list[list[SegmentEntry]] = []
    chosen: set[str] = set()
    by_tier: dict[int, list[SegmentEntry]] = {}
    for entry in segments:
        by_tier.setdefault(_tier(entry), []).append(entry)
    for tier in sorted(by_tier):
        members = by_tier[tier]
        while len(members) >= FANOUT:
            group, members = members[:FANOUT], members[FANOUT:]
            groups.append(group)
            chosen.update(e.name for e in group)
    for entry in segments:
        if entry.name not in chosen and entry.deleted and entry.deleted >= DELETED_SHARE * entry.docs:
            groups.append([entry])
    return groups
