"""A YARA string (text, hex or regex, with its modifiers) -> the gram formula of every match.

Each string is lowered to the pattern IR with every variant its modifiers allow (ascii and/or wide, case
variants, xor keys) as alternatives; `literals.pattern_plan` turns that into grams. `fullword` and
`private` only narrow or hide matches, so they change nothing here. `base64`/`base64wide` become the
three encodings YARA searches for. Anything not understood plans as TRUE: only verification decides it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import yaramod

from sspry.query import regex
from sspry.query.hexstr import HexError, parse_hex
from sspry.query.literals import (
    Alt,
    GramMapper,
    Pattern,
    Seq,
    analyze_pattern,
    fold_case,
    head,
    literal,
    map_sets,
    members,
    widen,
)
from sspry.query.plan import TRUE, Node, and_
from sspry.query.runs import fixed_bytes, run_fact

_XOR = re.compile(r"^xor(?:\(\s*(\w+)\s*(?:-\s*(\w+)\s*)?\))?$")


@dataclass(frozen=True)
class StringPlan:
    identifier: str
    node: Node  # holds for every file the string matches in
    note: str | None = None  # why the plan is weaker than the string, when it is
    exact: frozenset[Seq] | None = None  # every byte sequence the string matches, when few
    fullword: bool = False
    line: int = 0
    column: int = 0
    pattern: Pattern | None = field(default=None, compare=False, repr=False)  # not kept in stored plans

    def starts(self, limit: int) -> tuple[frozenset[Seq], bool] | None:
        """Byte-set sequences of at most `limit` positions, one of which every match starts with, and
        whether they are exactly its matches (none was cut); None when nothing is known (or a position
        allows no byte: the gram planner calls that an error)."""
        if self.exact is not None:
            seqs, whole = frozenset(s[:limit] for s in self.exact), all(len(s) <= limit for s in self.exact)
        elif self.pattern is not None:
            seq, whole = head(self.pattern, limit)
            seqs = frozenset({seq})
        else:
            return None
        return None if any(not seq or 0 in seq for seq in seqs) else (seqs, whole)


B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.S)
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b'"': b'"', b"\\": b"\\"}


def literal_text(text: str) -> bytes:
    """Value of a YARA string literal's body (between the quotes), escapes decoded."""
    raw = text.encode("utf-8")

    def decode(match: re.Match) -> bytes:
        escape = match.group(1)
        if escape.startswith(b"x"):
            return bytes([int(escape[1:], 16)])
        if escape not in _SIMPLE:
            raise ValueError(f"unknown escape in {text!r}")
        return _SIMPLE[escape]

    return _ESCAPE.sub(decode, raw)


def base64_forms(data: bytes, alphabet: bytes = B64) -> list[bytes]:
    """What YARA's `base64` looks for: for each of the three alignments of `data` in the encoded stream,
    the encoded characters that depend on `data` alone."""
    if len(alphabet) != 64:
        raise ValueError("a base64 alphabet has 64 characters")
    table = bytes.maketrans(B64, alphabet)
    forms = []
    for pad in range(3):
        encoded = base64.b64encode(b"\x00" * pad + data).rstrip(b"=")
        lead = (8 * pad + 5) // 6  # characters touched by the padding bytes
        full = (8 * (pad + len(data))) // 6  # characters fully determined by pad + data
        forms.append(encoded[lead:full].translate(table))
    return forms


def _base64_pattern(string) -> Pattern:
    forms = []
    for modifier in string.modifiers:
        if modifier.type in (yaramod.StringModifierType.Base64, yaramod.StringModifierType.Base64Wide):
            alphabet = B64
            if modifier.has_alphabet:
                body = modifier.text[modifier.text.index("(") + 1 : modifier.text.rindex(")")].strip()
                alphabet = literal_text(body[1:-1])
            encoded = [literal(form) for form in base64_forms(string.pure_text, alphabet)]
            if modifier.type == yaramod.StringModifierType.Base64Wide:
                encoded = [widen(form) for form in encoded]
            forms.extend(encoded)
    return Alt(tuple(forms))


def _xor_keys(modifier_text: str) -> range:
    match = _XOR.match(modifier_text.replace(" ", ""))
    if not match:
        raise ValueError(modifier_text)
    lo = int(match.group(1), 0) if match.group(1) else 0
    hi = int(match.group(2), 0) if match.group(2) else (lo if match.group(1) else 255)
    return range(lo, hi + 1)


def _xor_set(mask: int, key: int) -> int:
    out = 0
    for b in members(mask):
        out |= 1 << (b ^ key)
    return out


def _variants(base: Pattern, string) -> Pattern:
    """Alternatives for ascii/wide and xor keys, applied as YARA does (widen first, then xor)."""
    forms = []
    wide = string.is_wide
    if not wide or string.is_ascii:
        forms.append(base)
    if wide:
        forms.append(widen(base))
    if not string.is_xor:  # the modifiers are a list of new C++ wrappers each time: read them only for xor
        return forms[0] if len(forms) == 1 else Alt(tuple(forms))
    for modifier in string.modifiers:
        if modifier.type == yaramod.StringModifierType.Xor:
            keys = _xor_keys(modifier.text)
            forms = [map_sets(form, lambda m, k=key: _xor_set(m, k)) for form in forms for key in keys]
    return forms[0] if len(forms) == 1 else Alt(tuple(forms))


def _lowered(string, text: bytes) -> Pattern:
    """The string's bytes as the pattern IR, case folded when nocase, before wide/xor/base64 forms;
    `text` is its pure_text (read once by the caller; unused for a regex)."""
    if string.is_hex:
        return parse_hex(text.decode("ascii"))
    if string.is_regexp:
        pattern = regex.convert(string.unit)
        if "i" in (string.suffix_modifiers or "") or string.is_nocase:
            pattern = map_sets(pattern, fold_case)
        return pattern
    pattern = literal(text)
    return map_sets(pattern, fold_case) if string.is_nocase else pattern


def atom_bytes(string) -> int:
    """Fixed bytes in a row that every match of the string holds (runs.fixed_bytes): below 3, YARA
    has no good atom for it and checks it nearly everywhere. 0 for what is not understood."""
    try:
        return fixed_bytes(_lowered(string, b"" if string.is_regexp else string.pure_text))
    except (HexError, ValueError, UnicodeDecodeError):
        return 0


def _run_fact(base: Pattern, string) -> Node:
    """The run fields' fact for a string's forms (runs.py); TRUE for encodings that change its bytes."""
    if string.is_hex:
        return run_fact(base, ascii=True, wide=False, fullword=False)
    if string.is_base64 or string.is_base64_wide or string.is_xor:
        return TRUE
    ascii = string.is_ascii or not string.is_wide
    return run_fact(base, ascii=ascii, wide=string.is_wide, fullword=string.is_fullword)


# (formula, note, exact set, pattern; None when the string is not understood): what a string's text and
# modifiers plan to, whatever its name
Planned = tuple[Node, str | None, frozenset[Seq] | None, Pattern | None]


def plan_string(string, mapper: GramMapper) -> StringPlan:
    """A string's plan. Strings with the same text and modifiers (a third of Yara-Rules' hex strings
    repeat one before them) are planned once per mapper; a regex is planned every time."""
    # each property of a yaramod string is a call into C++ (pure_text of a hex string rebuilds its text):
    # read each once, and only those the kind of string has (a hex string has no other modifier than
    # `private`)
    identifier = string.identifier
    begin = string.location.begin
    line, column = begin.line, begin.column
    if string.is_hex:
        key: tuple | None = (True, string.pure_text)
    elif not string.is_regexp:
        key = (False, string.pure_text, string.modifiers_text)
    else:
        key = None  # a regex's text is not read at all (its AST is): planned every time
    planned: Planned | None = mapper.strings.get(key) if key is not None else None
    if planned is None:
        planned = _plan_pattern(string, key[1] if key is not None else b"", mapper)
        if key is not None:
            mapper.strings[key] = planned
    node, note, exact, pattern = planned
    if pattern is None:
        return StringPlan(identifier, TRUE, note, line=line, column=column)
    return StringPlan(identifier, node, note, exact, string.is_fullword, line, column, pattern)


def _plan_pattern(string, text: bytes, mapper: GramMapper) -> Planned:
    """The plan of a string whose text (for a hex or text string) is `text`."""
    try:
        pattern = _lowered(string, text)
        runs = _run_fact(pattern, string)
        if not string.is_hex:  # a hex string has no forms
            if string.is_base64 or string.is_base64_wide:
                pattern = _base64_pattern(string)
            else:
                pattern = _variants(pattern, string)
    except (HexError, ValueError, UnicodeDecodeError) as exc:
        return TRUE, f"not understood: {exc}", None, None
    node, exact = analyze_pattern(pattern, mapper)
    node = and_(node, runs)
    note = None if node is not TRUE else "no gram is certain to occur in its matches (too short or too loose)"
    return node, note, exact, pattern
