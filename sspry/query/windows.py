"""Which windows of n positions of a Seq to read as grams, when there are more than the anchor budget.

A window's *score* is how unusual it is in files: its bytes' weights (`weight`) summed, plus its number
of distinct bytes. The best windows have the highest score, the earliest first among equal scores.

Scores are computed for every window of a sequence at once, and for every gram size from one set of
per-position facts (`Lanes`): each fact is a Python integer holding one byte *lane* per position
(`int.from_bytes(..., "little")`), so shifting by 8·i bits lines position p + i up with position p and
one addition adds a whole row. No lane ever exceeds 4·8 = 32, so lanes never carry into each other.
The ranking was a Python loop per window: a fifth of planning Yara-Rules (cProfile) before it was this.
"""

from __future__ import annotations


def weight(b: int) -> int:
    """How unusual a byte is in files, heuristically (higher: fewer files contain grams with it)."""
    if b in (0x00, 0xFF):
        return 0
    if b in (0x20, 0xCC, 0x90, 0x01):
        return 1
    if 0x61 <= b <= 0x7A or 0x30 <= b <= 0x39:
        return 2
    return 3


_WEIGHTS = bytes(weight(b) for b in range(256))  # a translate table: byte -> its weight
_NONZERO = bytes([0] + [1] * 255)  # a translate table: byte -> 1 unless it is 0


class Lanes:
    """The per-position facts of one byte string (a Seq's lowest byte per position) that every window
    score is made of, shared by the gram sizes of the tiers."""

    __slots__ = ("_differs", "_size", "_value", "_weights")

    def __init__(self, raw: bytes):
        self._size = len(raw)
        self._value = int.from_bytes(raw, "little")
        self._weights = int.from_bytes(raw.translate(_WEIGHTS), "little")
        self._differs: dict[int, int] = {}

    def differs(self, d: int) -> int:
        """Lane p: 1 where byte p differs from byte p + d (lanes past the end: anything, never read)."""
        lanes = self._differs.get(d)
        if lanes is None:
            xor = self._value ^ (self._value >> (8 * d))
            lanes = int.from_bytes(xor.to_bytes(self._size, "little").translate(_NONZERO), "little")
            self._differs[d] = lanes
        return lanes

    def scores(self, n: int) -> bytes:
        """Per window start (len - n + 1 of them): its weights summed + its distinct bytes."""
        total = 0
        for i in range(n):
            total += self._weights >> (8 * i)
        # distinct bytes = 1 + the positions j > 0 whose byte differs from every byte before it
        total += int.from_bytes(b"\x01" * self._size, "little")
        for j in range(1, n):
            new = self.differs(j)
            for i in range(1, j):
                new &= self.differs(j - i) >> (8 * i)
            total += new
        return total.to_bytes(self._size, "little")[: self._size - n + 1]


def window_sums(values: bytes, n: int) -> bytes:
    """Per window of n positions (len - n + 1 of them): its values summed (each sum must be < 256)."""
    lanes = int.from_bytes(values, "little")
    total = 0
    for i in range(n):
        total += lanes >> (8 * i)
    return total.to_bytes(len(values), "little")[: max(0, len(values) - n + 1)]  # none when shorter


def best(scores: bytes, k: int) -> list[int]:
    """The starts of the k windows of highest score (earliest first among equals), in order."""
    if len(scores) <= k:
        return list(range(len(scores)))
    # the k-th highest score: every window above it is taken, and the earliest of those at it
    above = 0
    threshold = max(scores)
    while True:
        at = scores.count(threshold)
        if above + at >= k:
            break
        above += at
        threshold -= 1
    marks = scores.translate(_RANKS[threshold])
    starts = []
    for mark, wanted in ((2, above), (1, k - above)):
        start = -1
        for _ in range(wanted):
            start = marks.find(mark, start + 1)
            starts.append(start)
    return sorted(starts)


# per threshold: a translate table from a score to 2 (above the threshold), 1 (at it) or 0 (below)
_RANKS = [bytes(2 if v > t else 1 if v == t else 0 for v in range(256)) for t in range(256)]
