"""The value algebra of conditions: what a YARA value expression is, as far as the planner can tell.

A value expression becomes a `Term` -- a constant, a text, a linear function of filesize, a module field
(maybe masked), the entry point's offset, an integer read, a string count or offset, time.now, the whole
file's entropy or hash -- or None when it is none of these. Arithmetic on terms (`arithmetic`) and solving
`a * filesize + b OP value` for filesize (`solve_filesize`) live here; turning comparisons into plan facts
is the condition planner's (condition.py). Nothing here knows yaramod.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sspry.query.plan import FALSE, TRUE, Approx, Filesize, Node, or_

ENTRY_FIELDS = ("pe.entry_point", "elf.entry_point")

FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}  # a OP b == b FLIP[OP] a
READS = {  # YARA integer read functions: (width, signed, big endian)
    f"{'u' if unsigned else ''}int{bits}{'be' if big else ''}": (bits // 8, not unsigned, big)
    for bits in (8, 16, 32)
    for unsigned in (True, False)
    for big in (False, True)
}
_INT = re.compile(r"^(0x[0-9a-fA-F]+|0o[0-7]+|\d+)(KB|MB)?$")


def int_literal(text: str) -> int | None:
    """Value of a YARA integer literal. yaramod's own `.value` ignores KB/MB (10KB -> 10000, YARA
    means 10240), so the token text is read here."""
    match = _INT.match(text.strip())
    if not match:
        return None
    number, unit = match.groups()
    # YARA reads digits as decimal even with leading zeros (0100 is one hundred); octal needs 0o
    value = (
        int(number, 16) if number[:2] == "0x" else int(number[2:], 8) if number[:2] == "0o" else int(number)
    )
    return value * {None: 1, "KB": 1024, "MB": 1 << 20}[unit]


@dataclass(frozen=True)
class Const:
    value: int | float


@dataclass(frozen=True)
class Text:
    value: bytes


@dataclass(frozen=True)
class Size:
    """a * filesize + b"""

    a: int
    b: int


@dataclass(frozen=True)
class ModuleField:
    name: str


@dataclass(frozen=True)
class MaskedField:
    """module_field & mask"""

    name: str
    mask: int


@dataclass(frozen=True)
class EntryOffset:
    """The entry point's file offset plus `delta` (pe.entry_point + 4, entrypoint, ...). `field` is the
    module field it comes from: pe.entry_point is undefined for an ELF file, whose entry-point bytes are
    stored all the same (None for `entrypoint`, which YARA defines for both)."""

    delta: int
    field: str | None = None


@dataclass(frozen=True)
class Read:
    function: str
    source: str | None  # "prefix" or "entry" when the offset is known, else None
    offset: int | None
    mask: int = -1
    entry_field: str | None = None  # for "entry": EntryOffset.field


@dataclass(frozen=True)
class Counts:
    """A sum of string counts plus a constant: #a, #a + #b, #a - 2, ... Counts are never negative, so
    the value is at least `plus`, and above it only where one of the strings occurs."""

    strings: tuple[Node, ...]  # the strings' gram formulas (upper bounds of each string matching)
    plus: int = 0


@dataclass(frozen=True)
class OfString:
    """@a[i] or !a[i]: defined only when the string matched."""

    string: Approx


@dataclass(frozen=True)
class Now:
    pass


@dataclass(frozen=True)
class WholeEntropy:
    pass


@dataclass(frozen=True)
class WholeHash:
    algorithm: str


Term = (
    Const
    | Text
    | Size
    | ModuleField
    | MaskedField
    | EntryOffset
    | Read
    | Counts
    | OfString
    | Now
    | WholeEntropy
    | WholeHash
)
# Values YARA always defines while scanning a file; every other term may be undefined (a module field
# the file lacks, a read past its end, @a[i] without an i-th match, ...).
DEFINED_TERMS = (Const, Text, Size, Counts, Now)


def is_int(term: Term | None) -> bool:
    """A constant integer (not a float)."""
    return isinstance(term, Const) and isinstance(term.value, int)


def entry_offset(term: Term | None) -> Term | None:
    """pe.entry_point / elf.entry_point as an entry offset; any other term unchanged."""
    if isinstance(term, ModuleField) and term.name in ENTRY_FIELDS:
        return EntryOffset(0, term.name)
    return term


def holds(left, op: str, right) -> bool:
    return {
        "==": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


def negate(term: Term | None) -> Term | None:
    """-term, for the terms that have one."""
    if isinstance(term, Const):
        return Const(-term.value)
    if isinstance(term, Size):
        return Size(-term.a, -term.b)
    return None


def arithmetic(op: str, left: Term | None, right: Term | None) -> Term | None:
    """left OP right for OP in + - *, on the terms it stays a term for."""
    if op == "-":
        right = negate(right)
        if right is None:
            return None
        op = "+"
    if op == "+":
        if isinstance(left, Const) and isinstance(right, Const):
            return Const(left.value + right.value)
        if isinstance(right, Counts) and not isinstance(left, Counts):
            left, right = right, left
        if isinstance(left, Counts) and isinstance(right, Counts):
            return Counts(left.strings + right.strings, left.plus + right.plus)
        if isinstance(left, Counts) and is_int(right):
            return Counts(left.strings, left.plus + right.value)  # type: ignore[union-attr]
        if isinstance(right, Size) and not isinstance(left, Size):
            left, right = right, left
        if isinstance(left, Size) and is_int(right):
            return Size(left.a, left.b + right.value)  # type: ignore[union-attr]
        if isinstance(left, Size) and isinstance(right, Size):
            return Size(left.a + right.a, left.b + right.b)
        if isinstance(right, EntryOffset | ModuleField) and isinstance(left, Const):
            left, right = right, left
        if isinstance(left, ModuleField) and left.name in ENTRY_FIELDS and isinstance(right, Const):
            left = EntryOffset(0, left.name)
        if isinstance(left, EntryOffset) and is_int(right):
            return EntryOffset(left.delta + right.value, left.field)  # type: ignore[union-attr]
        return None
    assert op == "*"
    if isinstance(left, Const) and isinstance(right, Const):
        return Const(left.value * right.value)
    if isinstance(right, Size):
        left, right = right, left
    if isinstance(left, Size) and is_int(right):
        return Size(left.a * right.value, left.b * right.value)  # type: ignore[union-attr]
    return None


def counts_needed(left: Counts, op: str, right: Counts | Const) -> Node:
    """What `left OP right` needs of the strings of `left`: one of them must occur when the comparison
    cannot hold with all of them absent (left then equals left.plus) for any value `right` can take
    (exactly a constant's value; for counts, anything from right.plus up). Else TRUE."""
    if not left.strings:
        return TRUE
    if isinstance(right, Const):
        possible = holds(left.plus, op, right.value)
    elif op in ("<", "<=", "!="):
        possible = True  # right can always be large enough
    else:
        possible = left.plus > right.plus if op == ">" else left.plus >= right.plus
    return TRUE if possible else or_(*left.strings)


def solve_filesize(size: Size, op: str, value) -> Node:
    """Solve a * filesize + b OP value for filesize (an integer)."""
    a, target = size.a, value - size.b
    if a == 0:
        return TRUE if holds(0, op, target) else FALSE
    if a < 0:
        a, target, op = -a, -target, FLIP[op]
    quotient = target / a
    if op == "<":
        return Filesize("<", math.ceil(quotient))
    if op == "<=":
        return Filesize("<=", math.floor(quotient))
    if op == ">":
        return Filesize(">", math.floor(quotient))
    if op == ">=":
        return Filesize(">=", math.ceil(quotient))
    exact = quotient == int(quotient)
    if op == "==":
        return Filesize("==", int(quotient)) if exact else FALSE
    return Filesize("!=", int(quotient)) if exact else TRUE
