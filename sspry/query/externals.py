"""External variables (`-d NAME=VALUE`): values a rule names that YARA takes from the caller.

YARA compiles and scans with them (yara-python's `externals=`); the planner reads them as constants, so
`flag == 1` with flag=0 plans to no candidates. yaramod has no way to declare them: a text is parsed with
one placeholder rule per external in front of it (`declarations`), on its first line so every line
number stays the file's own. The planner then reads a name that is an external as its value, never as
that rule. A placeholder rule is boolean, so yaramod refuses an external used as a string (`filename
matches /x/`); such a file plans as TRUE, as any file yaramod cannot parse does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

Value = bool | int | float | str
Externals = Mapping[str, Value]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INTEGER = re.compile(r"-?(0x[0-9a-fA-F]+|\d+)")
_FLOAT = re.compile(r"-?\d+\.\d*|-?\d*\.\d+")


class ExternalError(ValueError):
    """A -d/--define that is not NAME=VALUE with a YARA identifier as NAME."""


def parse_define(text: str) -> tuple[str, Value]:
    """NAME=VALUE, typed as the yara command line types it: true/false a boolean, digits (or 0x...) an
    integer, digits with a point a float, anything else a string (one pair of surrounding double quotes
    removed)."""
    name, sep, raw = text.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise ExternalError(f"{text!r}: expected NAME=VALUE, NAME a YARA identifier")
    if raw in ("true", "false"):
        return name, raw == "true"
    if _INTEGER.fullmatch(raw):
        return name, int(raw, 0) if "x" in raw else int(raw)
    if _FLOAT.fullmatch(raw):
        return name, float(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    return name, raw


def parse_defines(texts: list[str] | tuple[str, ...]) -> dict[str, Value]:
    """Every -d of a command; a later one for the same name wins, as in yara."""
    return dict(parse_define(text) for text in texts)


def declarations(externals: Externals | None) -> str:
    """The placeholder rules yaramod needs to parse a text that names `externals` (one line, no
    newline: put in front of the text's first line)."""
    return "".join(f"rule {name} {{ condition: true }} " for name in sorted(externals or {}))


def digest_part(externals: Externals | None) -> str:
    """The externals as stable text, for cache keys (types kept: 1, 1.0, true and "1" differ)."""
    return json.dumps(sorted((k, type(v).__name__, v) for k, v in (externals or {}).items()))
