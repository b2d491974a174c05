"""What a pattern forces into every file it matches, as a plan over grams.

Text strings, hex strings and regular expressions are first lowered to one small IR (`Lit`, `Cat`, `Alt`,
`Rep`) over *byte sets*: a position may be one byte (`A`), a few (`[aA]` for nocase, `4?` for a nibble)
or any (`??`, `.`). A `Seq` is a sequence of byte sets, each set an int bitmask over the 256 byte values.

`analyze` then computes, bottom-up, the facts of Russ Cox's "Regular Expression Matching with a Trigram
Index": the exact set of Seqs the node matches (while small), sets of prefixes and suffixes every match
starts/ends with, and a `match` formula of what every match must contain. Concatenation adds the Seqs that
cross the boundary (suffix x prefix); alternation ORs; repetition keeps one copy (`a+`) or nothing (`a*`,
`a?`, `a{0,n}`). Every step only forgets, never invents, so the result is implied by every match: that is
what makes search recall 100%.

A Seq becomes grams window by window: each window of n positions expands to the product of its byte sets
(OR of those grams) when that product is small, and is skipped otherwise; the windows kept are ANDed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, reduce
from itertools import compress, product, repeat
from operator import or_ as or_bits
from typing import NamedTuple

from sspry.query.plan import TIER_BYTE, TRUE, And, Node, Or, and_, or_, tiered_gram
from sspry.query.windows import Lanes, best, window_sums

ALL = (1 << 256) - 1
DEFAULT_MAX_ANCHORS = 16  # grams read per literal and tier unless a search asks otherwise
MAX_SET = 16  # exact / prefix / suffix sets larger than this are abandoned
MAX_SEQ = 32  # prefixes and suffixes are trimmed to this many positions
MAX_VARIANTS = 16  # a window expanding to more grams than this tells us nothing worth reading
MAX_COPIES = 3  # `x{n,m}` contributes at most this many leading copies of x

Seq = tuple[int, ...]


def byte(value: int) -> int:
    return 1 << value


def byte_range(lo: int, hi: int) -> int:
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


@cache
def members(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(256) if mask >> b & 1)


def fold_case(mask: int) -> int:
    """Add the other case of every ASCII letter in the set."""
    upper = (mask >> ord("a")) & ((1 << 26) - 1)
    lower = (mask >> ord("A")) & ((1 << 26) - 1)
    return mask | (upper << ord("A")) | (lower << ord("a"))


# --- IR -------------------------------------------------------------------------------------------
class Pattern:
    """IR node base."""


@dataclass(frozen=True)
class Lit(Pattern):
    seq: Seq


@dataclass(frozen=True)
class Cat(Pattern):
    items: tuple[Pattern, ...]


@dataclass(frozen=True)
class Alt(Pattern):
    items: tuple[Pattern, ...]


@dataclass(frozen=True)
class Rep(Pattern):
    item: Pattern
    lo: int
    hi: int | None  # None: unbounded


EMPTY = Lit(())
ANY = Lit((ALL,))


SINGLE = tuple(byte(b) for b in range(256))  # byte -> the set of that byte alone


def literal(data: bytes) -> Lit:
    return Lit(tuple(map(SINGLE.__getitem__, data)))


def map_sets(pattern: Pattern, fn) -> Pattern:
    """Apply fn to every byte set of the pattern (case folding, xor keys, ...)."""
    if isinstance(pattern, Lit):
        return Lit(tuple(fn(s) for s in pattern.seq))
    if isinstance(pattern, Cat):
        return Cat(tuple(map_sets(p, fn) for p in pattern.items))
    if isinstance(pattern, Alt):
        return Alt(tuple(map_sets(p, fn) for p in pattern.items))
    assert isinstance(pattern, Rep)
    return Rep(map_sets(pattern.item, fn), pattern.lo, pattern.hi)


def widen(pattern: Pattern) -> Pattern:
    """UTF-16LE as YARA's `wide` does it: every byte followed by a zero byte."""
    if isinstance(pattern, Lit):
        wide = [byte(0)] * (2 * len(pattern.seq))
        wide[::2] = pattern.seq
        return Lit(tuple(wide))
    if isinstance(pattern, Cat):
        return Cat(tuple(widen(p) for p in pattern.items))
    if isinstance(pattern, Alt):
        return Alt(tuple(widen(p) for p in pattern.items))
    assert isinstance(pattern, Rep)
    return Rep(widen(pattern.item), pattern.lo, pattern.hi)


# --- analysis -------------------------------------------------------------------------------------
class Info(NamedTuple):  # a tuple: built for every node of every pattern, and cheaper than a dataclass
    exact: frozenset[Seq] | None
    prefix: frozenset[Seq]
    suffix: frozenset[Seq]
    match: tuple[Node, ...]  # an AND, kept open: a long concatenation builds one And node, not one per step


UPPER = byte_range(0x41, 0x5A)


def fold_down(mask: int) -> int:
    """The set with ASCII capitals replaced by their lowercase letters."""
    return (mask & ~UPPER) | ((mask & UPPER) << 0x20)


_folded = cache(fold_down)  # a few hundred distinct sets, met a million times


class GramMapper:
    """Turns Seqs into gram formulas for the two tiers, within an anchor budget per Seq and tier.

    A window of single bytes is one exact gram. Other windows expand to the product of their byte sets;
    in Tier 1 of a forest that folds case (every gram also indexed lowercased), their lowercased product
    is tested instead, so a nocase window is one gram, not up to 2**n. A Seq's formula is the AND of the
    chosen windows of every tier, built flat (one And node, no node per tier)."""

    def __init__(self, gram_sizes: Sequence[int], max_anchors: int, fold_case: bool = False):
        self.gram_sizes = tuple(gram_sizes)
        self.max_anchors = max_anchors
        self.fold_case = fold_case
        self._memo: dict[Seq, Node] = {}
        self._windows: dict[tuple[int, Seq], Node] = {}  # (tier, window of byte sets) -> OR of its grams
        self.strings: dict[tuple, tuple] = {}  # a string's text and modifiers -> its plan (strings.py)

    def seq(self, seq: Seq) -> Node:
        node = self._memo.get(seq)
        if node is None:
            try:  # most Seqs are one byte at every position
                raw = bytes(map(_BYTE_OF.__getitem__, seq))
            except KeyError:
                node = self._loose(seq)
            else:
                node = self._exact(raw)
            self._memo[seq] = node
        return node

    def any_of(self, seqs: frozenset[Seq]) -> Node:
        return or_(*(self.seq(s) for s in sorted(seqs)))

    @staticmethod
    def _nodes(tier: int, grams: list[bytes]) -> list[Node]:
        """The Gram node of each gram."""
        prefix = TIER_BYTE[tier]
        return [tiered_gram(prefix + gram) for gram in grams]

    def _exact(self, raw: bytes) -> Node:
        """A Seq of one byte per position: per tier, the grams of its best windows (`windows.best`)."""
        grams: list[Node] = []
        lanes = None
        for tier, n in enumerate(self.gram_sizes, start=1):
            count = len(raw) - n + 1
            if count <= 0:
                continue
            if count <= self.max_anchors:
                starts: Sequence[int] = range(count)
            else:
                lanes = lanes or Lanes(raw)
                starts = best(lanes.scores(n), self.max_anchors)
            prefix = TIER_BYTE[tier]
            grams += dict.fromkeys([tiered_gram(prefix + raw[s : s + n]) for s in starts])
        if not grams:
            return TRUE
        return grams[0] if len(grams) == 1 else And(*grams)

    def _loose(self, seq: Seq) -> Node:
        """A Seq with sets of several bytes: windows of at most MAX_VARIANTS variants, fewest variants
        first, then by score (of each position's lowest byte); each window one gram (no loose position)
        or the OR of its variants."""
        if 0 in seq:  # an empty byte set: nothing matches it (as before: planned as an error, TRUE)
            raise IndexError("tuple index out of range")
        first = bytes(map(_lowest, seq))  # the byte of a single-byte position
        sizes = list(map(int.bit_count, seq))
        loose = bytes(map((1).__lt__, sizes))
        lanes = None
        items: list[Node] = []
        for tier, n in enumerate(self.gram_sizes, start=1):
            if len(seq) < n:
                continue
            tested, counts = seq, sizes
            if self.fold_case and tier == 1:
                tested = tuple(map(_folded, seq))
                counts = list(map(int.bit_count, tested))
            inexact = window_sums(loose, n)  # non-zero: the window has a loose position
            variants = _variants(counts, n)
            starts = list(compress(range(len(variants)), variants.translate(_FEW)))
            if len(starts) > self.max_anchors:
                lanes = lanes or Lanes(first)
                scores = lanes.scores(n)  # < 64: fewest variants first, then highest score
                rank = [v * 64 - score for v, score in zip(variants, scores, strict=True)]
                starts = sorted(sorted(starts, key=rank.__getitem__)[: self.max_anchors])
            exact = iter(self._nodes(tier, [first[s : s + n] for s in starts if not inexact[s]]))
            for start in starts:
                if not inexact[start]:
                    items.append(next(exact))
                    continue
                window = tested[start : start + n]
                node = self._windows.get((tier, window))
                if node is None:  # every variant differs: the OR of their grams, as or_ would build it
                    grams = self._nodes(tier, list(map(b"".join, product(*map(_member_bytes, window)))))
                    node = self._windows[(tier, window)] = grams[0] if len(grams) == 1 else Or(*grams)
                items.append(node)
        return and_(*items)


@cache
def _lowest(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


@cache
def _member_bytes(mask: int) -> tuple[bytes, ...]:
    return tuple(bytes((b,)) for b in members(mask))


# per set size, its lane in a window sum: log2(size) + 1 for a power of two, 9 (as for 256) for any size
# over MAX_VARIANTS (a window holding one has too many variants whatever the others), None otherwise
_LANE = [c.bit_length() if c & (c - 1) == 0 else 9 if c > MAX_VARIANTS else None for c in range(257)]
_FEW = bytes(int(v <= MAX_VARIANTS) for v in range(256))  # translate table: variants -> chosen or not


def _variants(counts: list[int], n: int) -> bytes:
    """Per window of n positions: the number of its variants (the product of its set sizes), or
    MAX_VARIANTS + 1 for any more than MAX_VARIANTS."""
    try:  # sizes 1, 2 (a letter in any case), 16 (a nibble), over 16 (`??`, `~4D`, folded `??`) ...
        lanes = bytes(map(_LANE.__getitem__, counts))
    except TypeError:  # a size of 3, 5-7 or 9-15: the products one by one
        return bytes(map(min, map(math.prod, _windows(counts, n)), repeat(MAX_VARIANTS + 1)))
    # log2(size) + 1 per position, summed per window: the product is 2**(sum - n) (or too many)
    return window_sums(lanes, n).translate(_POWER_OF[n])


# per n: translate table from the summed log2(size) + 1 of a window of n positions to its variants
_POWER_OF = {
    n: bytes(1 << (v - n) if n <= v <= n + 4 else MAX_VARIANTS + 1 for v in range(256)) for n in range(1, 9)
}


_BYTE_OF = {1 << b: b for b in range(256)}  # a set of one byte -> that byte


def _windows(values: list, n: int) -> Iterator[tuple]:
    """Every run of n consecutive values, in order."""
    return zip(*(values[i:] for i in range(n)), strict=False)  # the shifted copies are shorter


def _limit(seqs: frozenset[Seq], keep_start: bool) -> frozenset[Seq]:
    """Trim a prefix (keep_start) or suffix set until it is small; () means "no information"."""
    length = max((len(s) for s in seqs), default=0)
    if length > MAX_SEQ:
        length = MAX_SEQ
        seqs = frozenset(s[:length] if keep_start else s[-length:] for s in seqs)
    while len(seqs) > MAX_SET and length > 0:
        length -= 1
        seqs = frozenset((s[:length] if keep_start else s[len(s) - length :]) if length else () for s in seqs)
    return seqs if len(seqs) <= MAX_SET else frozenset({()})


def _product(a: frozenset[Seq], b: frozenset[Seq]) -> frozenset[Seq] | None:
    if len(a) * len(b) > MAX_SET:
        return None
    return frozenset(x + y for x in a for y in b)


class Analyzer:
    def __init__(self, mapper: GramMapper):
        self.mapper = mapper

    def required(self, info: Info) -> Node:
        """Everything known to hold for every match of the node."""
        if info.exact is not None:
            return and_(*info.match, self.mapper.any_of(info.exact))
        return and_(*info.match, self.mapper.any_of(info.prefix), self.mapper.any_of(info.suffix))

    def analyze(self, pattern: Pattern) -> Info:
        if isinstance(pattern, Lit):
            exact = frozenset({pattern.seq})
            return Info(exact, exact, exact, ())
        if isinstance(pattern, Cat):
            info = self.analyze(EMPTY)
            for item in pattern.items:
                info = self._cat(info, self.analyze(item))
            return info
        if isinstance(pattern, Alt):
            infos = [self.analyze(item) for item in pattern.items]
            info = infos[0]
            for other in infos[1:]:
                info = self._alt(info, other)
            return info
        assert isinstance(pattern, Rep)
        return self._rep(pattern)

    def _cat(self, a: Info, b: Info) -> Info:
        if a.exact is not None and b.exact is not None:
            exact = _product(a.exact, b.exact)
            if exact is not None:
                return Info(exact, exact, exact, a.match + b.match)
        a_end = a.exact if a.exact is not None else a.suffix
        b_start = b.exact if b.exact is not None else b.prefix
        crossing = _product(a_end, b_start)
        if crossing is not None:
            join = self.mapper.any_of(crossing)
        else:
            join = and_(self.mapper.any_of(a_end), self.mapper.any_of(b_start))
        prefix = (a.exact is not None and _product(a.exact, b.prefix)) or a.prefix
        suffix = (b.exact is not None and _product(a.suffix, b.exact)) or b.suffix
        return Info(None, _limit(prefix, True), _limit(suffix, False), (*a.match, *b.match, join))

    def _alt(self, a: Info, b: Info) -> Info:
        if a.exact is not None and b.exact is not None and len(a.exact | b.exact) <= MAX_SET:
            exact = a.exact | b.exact
            return Info(exact, exact, exact, ())
        prefix = (a.exact if a.exact is not None else a.prefix) | (
            b.exact if b.exact is not None else b.prefix
        )
        suffix = (a.exact if a.exact is not None else a.suffix) | (
            b.exact if b.exact is not None else b.suffix
        )
        return Info(
            None, _limit(prefix, True), _limit(suffix, False), (or_(self.required(a), self.required(b)),)
        )

    def _rep(self, rep: Rep) -> Info:
        if rep.hi == 0:
            return self.analyze(EMPTY)
        if rep.lo == 0:
            if rep.hi == 1:
                return self._alt(self.analyze(EMPTY), self.analyze(rep.item))
            nothing = frozenset({()})
            return Info(None, nothing, nothing, ())
        item = self.analyze(rep.item)
        info = item
        for _ in range(min(rep.lo, MAX_COPIES) - 1):
            info = self._cat(info, item)
        if rep.hi == rep.lo and rep.lo <= MAX_COPIES:
            return info
        # More copies may follow (or were not expanded): keep what the leading copies force, and that
        # every match ends with a whole copy of the item.
        item_end = item.exact if item.exact is not None else item.suffix
        prefix = info.exact if info.exact is not None else info.prefix
        return Info(None, prefix, item_end, (self.required(info),))


def pattern_plan(pattern: Pattern, mapper: GramMapper) -> Node:
    """The gram formula every match of `pattern` satisfies."""
    return analyze_pattern(pattern, mapper)[0]


def analyze_pattern(pattern: Pattern, mapper: GramMapper) -> tuple[Node, frozenset[Seq] | None]:
    """(gram formula every match satisfies, the exact set of Seqs it matches when small)."""
    analyzer = Analyzer(mapper)
    info = analyzer.analyze(pattern)
    return analyzer.required(info), info.exact


def head(pattern: Pattern, limit: int) -> tuple[Seq, bool]:
    """The byte sets every match of `pattern` starts with, at most `limit` of them, and whether they are
    exactly its matches (one length, nothing cut). An alternation contributes the union of its
    alternatives' sets, position by position, as far as the shortest reaches (exact only when every
    alternative is a single byte set); a repetition its `lo` leading copies; everything stops at the
    first part whose length varies. For `$a at X`, where the stored bytes hold a short window. Not the
    Analyzer's `prefix` sets: those stop after MAX_COPIES copies of a repetition, and a PEiD jump `[4]`
    is four copies of `??` with fixed bytes after it."""
    if limit <= 0:
        return (), False
    if isinstance(pattern, Lit):
        return pattern.seq[:limit], len(pattern.seq) <= limit
    if isinstance(pattern, Cat):
        return _head_of(pattern.items, limit)
    if isinstance(pattern, Alt):
        heads = [head(item, limit) for item in pattern.items]
        if not heads:
            return (), False
        shortest = min(len(seq) for seq, _ in heads)
        union = tuple(
            reduce(or_bits, sets) for sets in zip(*(seq[:shortest] for seq, _ in heads), strict=True)
        )
        return union, all(whole and len(seq) == 1 for seq, whole in heads)
    assert isinstance(pattern, Rep)
    copies = min(pattern.lo, limit)  # a copy is at least one position long, or it adds nothing
    seq, whole = _head_of((pattern.item,) * copies, limit)
    return seq, whole and pattern.hi == pattern.lo and copies == pattern.lo


def _head_of(items: Sequence[Pattern], limit: int) -> tuple[Seq, bool]:
    """`head` of the concatenation of `items`."""
    found: Seq = ()
    for item in items:
        seq, whole = head(item, limit - len(found))
        found += seq
        if not whole:
            return found, False
    return found, True
