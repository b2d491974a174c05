"""A YARA string (text, hex or regex, with its modifiers) -> the gram formula of every match.

Each string is lowered to the pattern IR with every variant its modifiers allow (ascii and/or wide, case
variants, xor keys) as alternatives; `literals.pattern_plan` turns that into grams. `fullword` and
`private` only narrow or hide matches, so they change nothing here. A construct not handled yet plans as
TRUE: only verification can decide it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaramod

from sspry.query import regex
from sspry.query.hexstr import HexError, parse_hex
from sspry.query.literals import (
    Alt,
    GramMapper,
    Pattern,
    fold_case,
    literal,
    map_sets,
    members,
    pattern_plan,
    widen,
)
from sspry.query.plan import TRUE, Node

_XOR = re.compile(r"^xor(?:\(\s*(\w+)\s*(?:-\s*(\w+)\s*)?\))?$")


@dataclass(frozen=True)
class StringPlan:
    identifier: str
    node: Node  # holds for every file the string matches in
    note: str | None = None  # why the plan is weaker than the string, when it is


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
    if string.is_ascii or not string.is_wide:
        forms.append(base)
    if string.is_wide:
        forms.append(widen(base))
    for modifier in string.modifiers:
        if modifier.type == yaramod.StringModifierType.Xor:
            keys = _xor_keys(modifier.text)
            forms = [map_sets(form, lambda m, k=key: _xor_set(m, k)) for form in forms for key in keys]
    return forms[0] if len(forms) == 1 else Alt(tuple(forms))


def plan_string(string, mapper: GramMapper) -> StringPlan:
    identifier = string.identifier
    try:
        if string.is_hex:
            pattern = parse_hex(string.pure_text.decode("ascii"))
        elif string.is_regexp:
            pattern = regex.convert(string.unit)
            if "i" in (string.suffix_modifiers or "") or string.is_nocase:
                pattern = map_sets(pattern, fold_case)
        else:
            if string.is_base64 or string.is_base64_wide:
                return StringPlan(identifier, TRUE, "base64 strings are not planned yet")
            pattern = literal(string.pure_text)
            if string.is_nocase:
                pattern = map_sets(pattern, fold_case)
        if not string.is_hex:
            pattern = _variants(pattern, string)
    except (HexError, ValueError, UnicodeDecodeError) as exc:
        return StringPlan(identifier, TRUE, f"not understood: {exc}")
    node = pattern_plan(pattern, mapper)
    return StringPlan(identifier, node, None if node is not TRUE else "no gram is certain to occur")
