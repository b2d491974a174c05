"""yaramod regular-expression AST -> pattern IR.

yaramod parses the regex grammar; its leaves (a text unit such as `\\x41`, a class body such as
`0-9a-f\\-`) come as text, interpreted here. Whatever is not understood becomes "any string" (`.*`),
which can only cost precision, never recall.
"""

from __future__ import annotations

import yaramod

from sspry.query.literals import ALL, ANY, EMPTY, Alt, Cat, Lit, Pattern, Rep, byte, byte_range

UNKNOWN = Rep(ANY, 0, None)

_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "a": 0x07, "e": 0x1B, "v": 0x0B}
DIGIT = byte_range(0x30, 0x39)
WORD = DIGIT | byte_range(0x41, 0x5A) | byte_range(0x61, 0x7A) | byte(0x5F)
SPACE = byte(0x20) | byte_range(0x09, 0x0D)
_CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE, "D": ALL ^ DIGIT, "W": ALL ^ WORD, "S": ALL ^ SPACE}


class RegexError(ValueError):
    pass


def _read_char(text: str, at: int) -> tuple[int | str, int]:
    """One character of regex text: a byte value, or a class-escape letter (as str) such as "d"."""
    char = text[at]
    if char != "\\":
        encoded = char.encode("utf-8")
        if len(encoded) != 1:
            raise RegexError("multi-byte character")
        return encoded[0], at + 1
    if at + 1 >= len(text):
        raise RegexError("dangling backslash")
    escaped = text[at + 1]
    if escaped == "x":
        digits = text[at + 2 : at + 4]
        if len(digits) != 2:
            raise RegexError("short \\x escape")
        return int(digits, 16), at + 4
    if escaped in _ESCAPES:
        return _ESCAPES[escaped], at + 2
    if escaped in _CLASS_ESCAPES:
        return escaped, at + 2
    if escaped.isalnum():
        raise RegexError(f"unknown escape \\{escaped}")
    return ord(escaped), at + 2


def _text(text: str) -> Pattern:
    sets = []
    at = 0
    while at < len(text):
        value, at = _read_char(text, at)
        sets.append(_CLASS_ESCAPES[value] if isinstance(value, str) else byte(value))
    return Lit(tuple(sets))


def class_set(body: str, negative: bool) -> int:
    """The byte set of a character class body (the text between the brackets, without `^`)."""
    mask = 0
    at = 0
    if body.startswith("]"):  # a leading ] is literal
        mask |= byte(ord("]"))
        at = 1
    while at < len(body):
        value, at = _read_char(body, at)
        if isinstance(value, str):
            mask |= _CLASS_ESCAPES[value]
            continue
        if at + 1 < len(body) and body[at] == "-":
            upper, after = _read_char(body, at + 1)
            if isinstance(upper, str) or upper < value:
                raise RegexError("bad class range")
            mask |= byte_range(value, upper)
            at = after
        else:
            mask |= byte(value)
    return ALL ^ mask if negative else mask


def convert(unit) -> Pattern:
    """Lower one yaramod regexp unit (and its children) to the IR."""
    try:
        return _convert(unit)
    except (RegexError, ValueError, IndexError):
        return UNKNOWN


def _convert(unit) -> Pattern:
    # Exact types: in yaramod's binding `.`, `\d`, `^`, `\b`... all subclass RegexpText.
    kind = type(unit)
    if kind is yaramod.RegexpConcat:
        return Cat(tuple(convert(u) for u in unit.units))
    if kind is yaramod.RegexpText:
        return _text(unit.text)
    if kind is yaramod.RegexpClass:
        return Lit((class_set(unit.characters, unit.is_negative),))
    if kind is yaramod.RegexpGroup:
        return convert(unit.unit)
    if kind is yaramod.RegexpOr:
        return Alt((convert(unit.left), convert(unit.right)))
    if kind is yaramod.RegexpIteration:
        return Rep(convert(unit.operand), 0, None)
    if kind is yaramod.RegexpPositiveIteration:
        return Rep(convert(unit.operand), 1, None)
    if kind is yaramod.RegexpOptional:
        return Rep(convert(unit.operand), 0, 1)
    if kind is yaramod.RegexpRange:
        lo, hi = unit.range
        return Rep(convert(unit.operand), lo or 0, hi)
    if kind in _SETS:
        return Lit((_SETS[kind],))
    if kind in _ZERO_WIDTH:
        return EMPTY
    return UNKNOWN


_SETS = {
    yaramod.RegexpAnyChar: ALL,
    yaramod.RegexpDigit: DIGIT,
    yaramod.RegexpNonDigit: ALL ^ DIGIT,
    yaramod.RegexpWordChar: WORD,
    yaramod.RegexpNonWordChar: ALL ^ WORD,
    yaramod.RegexpSpace: SPACE,
    yaramod.RegexpNonSpace: ALL ^ SPACE,
}
_ZERO_WIDTH = {
    yaramod.RegexpStartOfLine,
    yaramod.RegexpEndOfLine,
    yaramod.RegexpWordBoundary,
    yaramod.RegexpNonWordBoundary,
}
