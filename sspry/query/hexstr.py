"""Hex string bodies -> pattern IR.

yaramod gives a hex string's body only as text (comments already removed), so its small grammar is parsed
here: bytes `4D`, wildcards `??`, nibbles `4?` / `?A`, negations `~4D` / `~?A`, jumps `[n]`, `[n-m]`,
`[n-]`, `[-]`, and alternatives `( aa | bb cc )`, nested, over any whitespace or line breaks.
"""

from __future__ import annotations

import re
from functools import cache

from sspry.query.literals import ALL, ANY, SINGLE, Alt, Cat, Lit, Pattern, Rep, byte

_BYTE = r"[0-9A-Fa-f?]{2}"
# a run of bytes (one token for the lot: long hex strings are mostly runs), a negated byte, a jump, or
# a parenthesis / bar
_TOKEN = re.compile(
    rf"\s*(?:(?P<run>{_BYTE}(?:\s*{_BYTE})*)|~(?P<negated>{_BYTE})"
    r"|\[\s*(?P<lo>\d*)\s*(?P<dash>-)?\s*(?P<hi>\d*)\s*\]|(?P<punct>[()|]))"
)
_PAIR = re.compile(_BYTE)


class HexError(ValueError):
    """A hex body this parser does not understand (the planner then treats the string as unknown)."""


@cache  # 17 x 17 spellings at most; `??` alone would otherwise cost 256 shifts per use
def _byte_set(text: str) -> int:
    hi, lo = text[0], text[1]
    highs = range(16) if hi == "?" else (int(hi, 16),)
    lows = range(16) if lo == "?" else (int(lo, 16),)
    mask = 0
    for h in highs:
        for low in lows:
            mask |= byte(h << 4 | low)
    return mask


def _run(text: str) -> list[int]:
    """The byte sets of a run of pairs (whitespace between them allowed)."""
    compact = "".join(text.split())
    if "?" not in compact:  # plain bytes, the common case: decoded at once
        return list(map(SINGLE.__getitem__, bytes.fromhex(compact)))
    return list(map(_byte_set, _PAIR.findall(compact)))


def _plain(body: str) -> Lit | None:
    """A body of byte pairs alone (no jump, alternative or `~`: nine in ten of Yara-Rules' hex strings),
    decoded at once; None for any other body."""
    try:  # pairs of hex digits or `?`, whitespace only between pairs
        data = bytes.fromhex(body.replace("?", "0"))
    except ValueError:
        return None
    if not data:
        return None
    if "?" not in body:
        return Lit(tuple(map(SINGLE.__getitem__, data)))
    pairs = body.split()
    if len(body) != 3 * len(pairs) - 1:  # not yaramod's one space between pairs
        pairs = _PAIR.findall("".join(pairs))
    return Lit(tuple(map(_byte_set, pairs)))


def _tokens(body: str) -> list[tuple]:
    tokens = []
    at = 0
    body = body.strip()
    while at < len(body):
        match = _TOKEN.match(body, at)
        if not match or match.end() == at:
            raise HexError(f"unexpected {body[at : at + 10]!r} in hex string")
        at = match.end()
        if match.group("run"):
            tokens.append(("run", _run(match.group("run"))))
        elif match.group("negated"):
            tokens.append(("run", [ALL ^ _byte_set(match.group("negated"))]))
        elif match.group("punct"):
            tokens.append((match.group("punct"),))
        else:
            lo_text, dash, hi_text = match.group("lo"), match.group("dash"), match.group("hi")
            if not dash:
                if not lo_text:
                    raise HexError("empty jump []")
                lo = hi = int(lo_text)
            else:
                lo = int(lo_text) if lo_text else 0
                hi = int(hi_text) if hi_text else None
            if hi is not None and hi < lo:
                raise HexError(f"jump [{lo}-{hi}] with a bound below its start")
            tokens.append(("jump", lo, hi))
        while at < len(body) and body[at].isspace():
            at += 1
    return tokens


def parse_hex(body: str) -> Pattern:
    """Parse the text between the braces of a hex string."""
    body = body.strip().strip("{}")
    plain = _plain(body)
    if plain is not None:
        return plain
    tokens = _tokens(body)
    pattern, at = _sequence(tokens, 0)
    if at != len(tokens):
        raise HexError("unbalanced parentheses in hex string")
    return pattern


def _sequence(tokens: list[tuple], at: int) -> tuple[Pattern, int]:
    items: list[Pattern] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            items.append(Lit(tuple(run)))
            run.clear()

    while at < len(tokens):
        kind = tokens[at][0]
        if kind == "run":
            run.extend(tokens[at][1])
        elif kind == "jump":
            flush()
            items.append(Rep(ANY, tokens[at][1], tokens[at][2]))
        elif kind == "(":
            flush()
            branches = []
            at += 1
            while True:
                branch, at = _sequence(tokens, at)
                branches.append(branch)
                if at >= len(tokens):
                    raise HexError("unclosed ( in hex string")
                if tokens[at][0] == ")":
                    break
                at += 1  # skip "|"
            items.append(Alt(tuple(branches)))
        else:  # ")" or "|": the caller's
            break
        at += 1
    flush()
    return (items[0] if len(items) == 1 else Cat(tuple(items))), at
