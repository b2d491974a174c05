"""What a pattern forces on the runs of a byte class in what it matches: hex digits, for the sidecar's
run fields (features/runs.py); fixed bytes, for how well YARA can find it (`fixed_bytes`).

A string such as `/[0-9a-fA-F]{32}/` holds no gram certain to occur, but every match of it is 32 hex
digits in a row, so only files whose longest run of hex digits is 32 or more can match. `hex_runs`
computes, bottom-up over the pattern IR, bounds that hold for every match:

- `inner`: every match contains a run of at least this many hex digits;
- `prefix` / `suffix`: every match starts / ends with at least this many;
- `whole`: every byte of every match is a hex digit (then all three are the shortest match's length,
  and `longest` the longest match's, None when unbounded).

Like the gram analysis it only forgets (an unknown construct is "any string", which forces nothing),
so a requirement derived here holds for every file a string matches. `run_fact` turns them into facts
over the run fields for the forms a string takes (ascii, wide, fullword); documents indexed without
the fields stay candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from sspry.features.runs import (
    HEX_DIGITS,
    HEX_RUN,
    HEX_WORD,
    HEX_WORD_LENGTHS,
    LONG_WORD,
    RUN_MIN,
    WIDE_HEX_RUN,
)
from sspry.query.literals import Alt, Cat, Lit, Pattern, Rep, fold_case
from sspry.query.plan import FALSE, TRUE, Field, Node, field_present, not_, or_

HEX_MASK = sum(1 << b for b in HEX_DIGITS)


class Runs(NamedTuple):  # a tuple: built for every node of every pattern planned
    inner: int
    prefix: int
    suffix: int
    whole: bool
    longest: int | None = None


NONE = Runs(0, 0, 0, False)


def _all_in(length: int, longest: int | None) -> Runs:
    return Runs(length, length, length, True, longest)


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


class _Flags(dict):
    """byte set -> 1 if the member test accepts it, else 0; computed once per distinct set (a pattern's
    positions are a few hundred distinct sets, met about a million times in Yara-Rules)."""

    def __init__(self, member: Callable[[int], bool]):
        super().__init__()
        self.member = member

    def __missing__(self, mask: int) -> int:
        flag = self[mask] = int(self.member(mask))
        return flag


def _is_hex(mask: int) -> bool:
    return mask != 0 and mask & ~HEX_MASK == 0


def _is_fixed(mask: int) -> bool:
    """One byte, or one letter in either case (YARA finds nocase atoms as well)."""
    return mask != 0 and (mask & (mask - 1) == 0 or fold_case(mask & -mask) == mask)


_HEX, _FIXED = _Flags(_is_hex), _Flags(_is_fixed)


def hex_runs(pattern: Pattern) -> Runs:
    """Bounds on the hex-digit runs of every match of `pattern` (see the module docstring)."""
    return class_runs(pattern, _HEX)


def fixed_bytes(pattern: Pattern) -> int:
    """How many fixed bytes in a row every match of `pattern` holds: YARA looks a string up by an atom
    of up to 4 such bytes, so a string with fewer than 3 (a regex over a class, hex with a wildcard
    every other byte) is checked at nearly every offset of every file it scans."""
    return class_runs(pattern, _FIXED).inner


def class_runs(pattern: Pattern, member: _Flags) -> Runs:
    """Bounds on the runs of byte sets `member` accepts, in every match of `pattern`."""
    if isinstance(pattern, Lit):
        flags = bytes(map(member.__getitem__, pattern.seq))
        if 0 not in flags:
            return _all_in(len(flags), len(flags))
        runs = flags.split(b"\x00")  # the runs of accepted sets, between refused ones
        return Runs(len(max(runs, key=len)), len(runs[0]), len(runs[-1]), False)
    if isinstance(pattern, Cat):
        result = _all_in(0, 0)
        for item in pattern.items:
            result = _cat(result, class_runs(item, member))
        return result
    if isinstance(pattern, Alt):
        items = [class_runs(item, member) for item in pattern.items]
        return Runs(
            min(r.inner for r in items),
            min(r.prefix for r in items),
            min(r.suffix for r in items),
            all(r.whole for r in items),
            None if any(r.longest is None for r in items) else max(r.longest for r in items),
        )
    assert isinstance(pattern, Rep)
    if pattern.hi == 0:
        return _all_in(0, 0)
    item = class_runs(pattern.item, member)
    if item.whole:  # an all-hex item's bounds are its shortest length
        longest = None if pattern.hi is None or item.longest is None else pattern.hi * item.longest
        return _all_in(pattern.lo * item.inner, longest)
    if pattern.lo == 0:
        return NONE
    joined = item.suffix + item.prefix if pattern.lo >= 2 else 0
    return Runs(max(item.inner, joined), item.prefix, item.suffix, False)


def _cat(a: Runs, b: Runs) -> Runs:
    return Runs(
        max(a.inner, b.inner, a.suffix + b.prefix),
        a.inner + b.prefix if a.whole else a.prefix,
        b.inner + a.suffix if b.whole else b.suffix,
        a.whole and b.whole,
        _sum(a.longest, b.longest),
    )


def _absent(field: str) -> Node:
    """The document has no such field: indexed before it existed, so it stays a candidate."""
    return not_(field_present(field))


def _at_least(field: str, value: int) -> Node:
    """field >= value, or the document has no such field: maybe."""
    return or_(Field(field, ">=", value), _absent(field))


def _word_fact(shortest: int, longest: int | None) -> Node:
    """A fullword hex run of a length in [shortest, longest]: the exact lengths below LONG_WORD, the
    longest word above."""
    if longest is not None and longest < LONG_WORD:
        bits = sum(1 << n for n in range(shortest, longest + 1))
        return _has_bits(HEX_WORD_LENGTHS, bits)
    if shortest >= LONG_WORD:
        return _at_least(HEX_WORD, shortest)
    bits = sum(1 << n for n in range(shortest, LONG_WORD + 1))  # bit LONG_WORD: some longer word
    return _has_bits(HEX_WORD_LENGTHS, bits)


def _has_bits(field: str, bits: int) -> Node:
    """field & bits != 0, or the document has no such field: maybe."""
    return or_(Field(field, "&", bits), _absent(field))


def run_fact(pattern: Pattern, ascii: bool, wide: bool, fullword: bool) -> Node:
    """What every file matching `pattern` (before widening) in the given forms holds: TRUE when the
    pattern forces no run of RUN_MIN hex digits or more."""
    runs = hex_runs(pattern)
    if runs.inner < RUN_MIN:
        return TRUE
    forms = FALSE
    if ascii:
        if fullword and runs.whole:  # the match is a whole word of hex digits
            forms = or_(forms, _word_fact(runs.inner, runs.longest))
        else:
            forms = or_(forms, _at_least(HEX_RUN, runs.inner))
    if wide:
        forms = or_(forms, _at_least(WIDE_HEX_RUN, runs.inner))
    return forms


def describe(fact: Field) -> str | None:
    """A run field's test in words (for rule-check), or None for a field that is not one of them or
    for the presence tests that keep old documents."""
    if fact.op in ("==", "!=") or fact.name not in (HEX_RUN, HEX_WORD, WIDE_HEX_RUN, HEX_WORD_LENGTHS):
        return None
    if fact.name == HEX_WORD_LENGTHS:
        lengths = [n for n in range(RUN_MIN, LONG_WORD + 1) if fact.value >> n & 1]
        if lengths[-1] == LONG_WORD:
            return f"a fullword run of {lengths[0]} or more hex digits"
        span = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        return f"a fullword run of {span} hex digits"
    kind = {HEX_RUN: "", HEX_WORD: "fullword ", WIDE_HEX_RUN: "wide "}[fact.name]
    return f"a {kind}run of {fact.value} or more hex digits"
