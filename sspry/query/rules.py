"""Loading a rule file: compiled by yara-python (the judge of what is valid and what the rules are).

A search sends the rules' whole source with includes inlined (`text`), so a server never opens a path
named in a rule. A source that includes nothing (YARA compiles it with includes disabled: most do) is
sent as it is, and the planner's one yaramod parse is the only one; otherwise yaramod parses the file
with its includes and gives back the inlined text. A file yaramod refuses is still searched: every rule
plans as TRUE.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yara
import yaramod

from sspry.query.externals import Externals, declarations

_local = threading.local()


def yaramod_parser() -> yaramod.Yaramod:
    """This thread's parser: building one loads every module definition (~25 ms), so it is reused."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = yaramod.Yaramod()
    return parser


RELEASE_PARSE_CHARS = 1 << 20  # after parsing a source this large, the parser is let go (release_parser)


def release_parser() -> None:
    """Let this thread's parser go, with the file it parsed last: yaramod keeps it, and for the 12,774
    rules of Yara-Rules that is about 660 MB. The freed heap goes back to the system where glibc's
    malloc_trim exists (else it is only reused). The next parse builds a parser again (~25 ms)."""
    _local.parser = None
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


class RuleError(Exception):
    """A rule file that cannot be used: missing, unreadable, not valid YARA, or without rules."""


@dataclass(frozen=True)
class RuleSource:
    """What a search needs of a rule file, independent of where it came from."""

    name: str  # the file's path, for messages
    text: str | None  # the source with includes inlined; None when yaramod could not parse it
    targets: tuple[str, ...]  # rules to report: the public ones, in file order
    parse_error: str | None = None  # why yaramod could not parse it (then every rule plans as TRUE)
    parsed: yaramod.YaraFile | None = field(default=None, compare=False, repr=False)  # yaramod's parse
    externals: dict = field(default_factory=dict)  # name -> value (-d NAME=VALUE), for YARA and the planner


def _refused(exc: Exception) -> str:
    """YARA's complaint, with the likely fix when it is a name it does not know."""
    message = str(exc)
    if "undefined identifier" in message:
        message += " (an external variable? give it with -d NAME=VALUE)"
    return message


def compile_rules(path: str, externals: Externals | None = None) -> yara.Rules:
    """yara-python's compilation of the file, or RuleError naming the file and line."""
    if not os.path.isfile(path):
        raise RuleError(f"{path}: rule file not found")
    try:
        return yara.compile(filepath=path, externals=dict(externals or {}))
    except yara.SyntaxError as exc:
        raise RuleError(f"invalid YARA rule: {_refused(exc)}") from exc
    except yara.Error as exc:
        raise RuleError(f"{path}: cannot compile: {_refused(exc)}") from exc


def compile_text(text: str, externals: Externals | None = None) -> yara.Rules:
    """yara-python's compilation of rule text (includes relative to the working directory)."""
    try:
        return yara.compile(source=text, externals=dict(externals or {}))
    except yara.SyntaxError as exc:
        raise RuleError(f"invalid YARA rule: {_refused(exc)}") from exc
    except (yara.Error, ValueError, TypeError) as exc:  # ValueError: a NUL in the text
        raise RuleError(f"cannot compile the rule text: {_refused(exc)}") from exc


def parse(
    rule: str | None = None, path: str | None = None, externals: Externals | None = None
) -> yaramod.YaraFile:
    """yaramod's parse of rule text or a rule file (raises whatever yaramod raises); with externals,
    of the text behind their declarations (externals.declarations)."""
    if externals:
        text = rule if path is None else Path(path).read_text(encoding="utf-8")
        return yaramod_parser().parse_string(declarations(externals) + text)
    return yaramod_parser().parse_string(rule) if path is None else yaramod_parser().parse_file(path)


def _self_contained(
    rule: str | None, path: str | None, externals: Externals | None
) -> tuple[str, yara.Rules] | None:
    """(the source, compiled) when it includes nothing and is UTF-8 text, else None."""
    try:
        text = rule if path is None else Path(path).read_bytes().decode("utf-8")
        compiled = yara.compile(source=text, includes=False, externals=dict(externals or {}))  # type: ignore[arg-type]
        return text, compiled  # type: ignore[return-value]
    except (yara.Error, OSError, UnicodeDecodeError, ValueError, TypeError):
        return None


def load_rules(
    rule: str | None = None, path: str | None = None, externals: Externals | None = None
) -> tuple[RuleSource, yara.Rules]:
    """Rule text or a rule file (exactly one), compiled, with its source with includes inlined;
    RuleError when YARA refuses it. A file with includes that names externals plans as TRUE (yaramod
    inlines includes only when it parses the file itself, and then cannot be told the externals)."""
    if (rule is None) == (path is None):
        raise ValueError("give the rule text (rule=) or a rule file (path=), not both")
    externals = dict(externals or {})
    alone = _self_contained(rule, path, externals)
    if alone is not None:
        text, compiled = alone
        return RuleSource(
            path or "<rule text>", text, _targets(compiled, path), externals=externals
        ), compiled
    compiled = compile_rules(path, externals) if path is not None else compile_text(rule, externals)  # type: ignore[arg-type]
    name = path if path is not None else "<rule text>"
    targets = _targets(compiled, path)
    try:
        parsed = parse(rule, path)
        text, error = parsed.text, None
    except Exception as exc:  # yaramod raises its own ParserError and sometimes RuntimeError
        parsed, text, error = None, None, str(exc)
    return RuleSource(name, text, targets, error, parsed, externals), compiled


def _targets(compiled: yara.Rules, path: str | None) -> tuple[str, ...]:
    """The rules a search reports: the public ones, in file order (every one when none is public)."""
    all_rules = list(compiled)
    if not all_rules:
        raise RuleError(f"{path}: no rules in file" if path is not None else "no rules in the text")
    public = tuple(r.identifier for r in all_rules if not r.is_private)
    return public or tuple(r.identifier for r in all_rules)


def load_rule_file(path: str) -> tuple[RuleSource, yara.Rules]:
    return load_rules(path=path)


def load_for_search(
    rule: str | None, path: str | None, note: Callable[[str], None], externals: Externals | None = None
) -> tuple[RuleSource, yara.Rules, float]:
    """`load_rules`, timed (ms), telling `note` when yaramod cannot parse what YARA compiled."""
    started = time.perf_counter()
    source, compiled = load_rules(rule, path, externals)
    if source.parse_error:
        note(
            f"yaramod cannot parse {source.name}, so every document is a candidate of its rules "
            f"(verification decides): {source.parse_error}"
        )
    return source, compiled, (time.perf_counter() - started) * 1000
