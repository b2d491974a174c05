"""Loading rules: compiled by yara-python (the judge of what is valid and what the rules are), one YARA
namespace per rule file.

`--rule` may be given several times, each a file or a directory (its `.yar`/`.yara` files, recursively):
each file is compiled in a namespace of its own, as `yara` does with several rule files, so two files
may hold rules of the same name and a `global` rule restricts only the rules of its own file. A
namespace is named after the file's path relative to the directory given (a file given directly: its
path as given; `NS:FILE` names it, as yara's command line does); one file alone is in YARA's namespace
`default`, and results name its rules plainly. With more than one, a rule is named `namespace:rule`.

A search sends each namespace's whole source with includes inlined (`text`), so a server never opens a
path named in a rule. A source that includes nothing (YARA compiles it with includes disabled: most do)
is sent as it is, and the planner's one yaramod parse is the only one; otherwise yaramod parses the file
with its includes and gives back the inlined text. A file yaramod refuses is still searched: every rule
of it plans as TRUE.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yara
import yaramod

from sspry.query.externals import Externals, declarations

_local = threading.local()

DEFAULT_NAMESPACE = "default"  # YARA's (and yara-x's) namespace of a rule file given alone
RULE_SUFFIXES = (".yar", ".yara")  # the files a directory given as --rule contributes


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


RuleText = str | Mapping[str, str]  # rule text, or namespace -> rule text
RulePaths = str | os.PathLike | Sequence[str | os.PathLike]  # rule files and directories (rule_specs)


class RuleError(Exception):
    """Rules that cannot be used: a file missing or unreadable, not valid YARA, or without rules."""


@dataclass(frozen=True)
class Spec:
    """Where one namespace's rules come from: rule text or a rule file (exactly one)."""

    namespace: str
    text: str | None = None
    path: str | None = None

    @property
    def origin(self) -> str:
        """The file's path, or "<rule text>", for messages."""
        if self.path is not None:
            return self.path
        return "<rule text>" if self.namespace == DEFAULT_NAMESPACE else f"<rule text {self.namespace}>"


@dataclass(frozen=True)
class Namespace:
    """One namespace's rules as a search needs them."""

    name: str  # the YARA namespace
    origin: str  # the file's path, for messages
    text: str | None  # the source with includes inlined; None when yaramod could not parse it
    targets: tuple[str, ...]  # rules to report: the public ones, in file order
    parse_error: str | None = None  # why yaramod could not parse it (then every rule plans as TRUE)
    parsed: yaramod.YaraFile | None = field(default=None, compare=False, repr=False)  # yaramod's parse
    compiled: yara.Rules | None = field(default=None, compare=False, repr=False)  # in this namespace


@dataclass(frozen=True)
class RuleSource:
    """The rules of a search: one or more namespaces, and the external variables they are compiled
    with. `targets` names every rule to report, in order (`namespace:rule` when there are several)."""

    namespaces: tuple[Namespace, ...]
    externals: dict = field(default_factory=dict)  # name -> value (-d NAME=VALUE), for YARA and the planner

    @property
    def name(self) -> str:
        return ", ".join(ns.origin for ns in self.namespaces)

    def qualify(self, namespace: str, rule: str) -> str:
        """A rule's name in results: `namespace:rule` when more than one namespace is searched."""
        return f"{namespace}:{rule}" if len(self.namespaces) > 1 else rule

    @cached_property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.qualify(ns.name, rule) for ns in self.namespaces for rule in ns.targets)

    @cached_property
    def locate(self) -> dict[str, tuple[Namespace, str]]:
        """A name of `targets` -> its namespace and the rule's own name."""
        return {self.qualify(ns.name, rule): (ns, rule) for ns in self.namespaces for rule in ns.targets}


def _refused(exc: Exception) -> str:
    """YARA's complaint, with the likely fix when it is a name it does not know."""
    message = str(exc)
    if "undefined identifier" in message:
        message += " (an external variable? give it with -d NAME=VALUE)"
    return message


def compile_spec(spec: Spec, externals: Externals | None = None, includes: bool = True) -> yara.Rules:
    """yara-python's compilation of one namespace's rules, in that namespace, or RuleError naming the
    file and line."""
    externals = dict(externals or {})
    try:
        if spec.path is not None:
            if not os.path.isfile(spec.path):
                raise RuleError(f"{spec.path}: rule file not found")
            return yara.compile(filepaths={spec.namespace: spec.path}, externals=externals, includes=includes)
        return yara.compile(sources={spec.namespace: spec.text}, externals=externals, includes=includes)
    except yara.SyntaxError as exc:
        raise RuleError(f"invalid YARA rule: {_refused(exc)}") from exc
    except yara.Error as exc:
        raise RuleError(f"{spec.origin}: cannot compile: {_refused(exc)}") from exc
    except (ValueError, TypeError) as exc:  # ValueError: a NUL in the text
        raise RuleError(f"{spec.origin}: cannot compile: {exc}") from exc


def parse(
    rule: str | None = None, path: str | None = None, externals: Externals | None = None
) -> yaramod.YaraFile:
    """yaramod's parse of rule text or a rule file (raises whatever yaramod raises); with externals,
    of the text behind their declarations (externals.declarations)."""
    if externals:
        text = rule if path is None else Path(path).read_text(encoding="utf-8")
        return yaramod_parser().parse_string(declarations(externals) + text)
    return yaramod_parser().parse_string(rule) if path is None else yaramod_parser().parse_file(path)


def _split_namespace(argument: str) -> tuple[str | None, str]:
    """`NS:FILE` -> (NS, FILE) when FILE exists and the whole argument does not; else (None, argument)."""
    namespace, sep, rest = argument.partition(":")
    if sep and namespace and not os.path.exists(argument) and os.path.exists(rest):
        return namespace, rest
    return None, argument


def _directory_files(directory: str) -> Iterator[tuple[str, str]]:
    """(path relative to `directory`, path) of its rule files, recursively, in sorted order."""
    for folder, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(RULE_SUFFIXES):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, directory), path


def rule_specs(rule: RuleText | None = None, path: RulePaths | None = None) -> list[Spec]:
    """The namespaces of rule text (`rule`: one text, or namespace -> text) or of rule files (`path`:
    one or several files or directories, see the module docstring), exactly one of the two; RuleError
    for a path that is neither a file nor a directory, a directory without rule files, or a namespace
    named twice."""
    if (rule is None) == (path is None):
        raise ValueError("give the rule text (rule=) or rule files (path=), not both")
    if isinstance(rule, str):
        return [Spec(DEFAULT_NAMESPACE, text=rule)]
    if rule is not None:
        specs = [Spec(str(name), text=text) for name, text in rule.items()]
    else:
        specs = []
        for argument in [path] if isinstance(path, (str, os.PathLike)) else list(path):  # type: ignore[arg-type]
            namespace, given = _split_namespace(os.fspath(argument))
            if os.path.isdir(given):
                found = [Spec(r, path=p) for r, p in _directory_files(given)]
                if not found:
                    raise RuleError(f"{given}: no {' or '.join(RULE_SUFFIXES)} files in the directory")
                specs.extend(found)
            elif os.path.isfile(given):
                specs.append(Spec(namespace or given, path=given))
            else:
                raise RuleError(f"{given}: rule file not found")
    if not specs:
        raise RuleError("no rules given")
    if len(specs) == 1:
        return [Spec(DEFAULT_NAMESPACE, specs[0].text, specs[0].path)]
    seen: dict[str, Spec] = {}
    for spec in specs:
        if spec.namespace in seen:
            raise RuleError(
                f"namespace {spec.namespace!r} given twice ({seen[spec.namespace].origin}, {spec.origin})"
            )
        seen[spec.namespace] = spec
    return specs


def _self_contained(spec: Spec, externals: Externals | None) -> tuple[str, yara.Rules] | None:
    """(the source, compiled) when it includes nothing and is UTF-8 text, else None."""
    try:
        text = spec.text if spec.path is None else Path(spec.path).read_bytes().decode("utf-8")
        return text, compile_spec(Spec(spec.namespace, text=text), externals, includes=False)  # type: ignore[return-value]
    except (RuleError, OSError, UnicodeDecodeError):
        return None


def load_namespace(spec: Spec, externals: Externals | None = None) -> Namespace:
    """One namespace compiled (RuleError when YARA refuses it), with its source with includes inlined.
    A file with includes that names externals plans as TRUE (yaramod inlines includes only when it
    parses the file itself, and then cannot be told the externals)."""
    alone = _self_contained(spec, externals)
    if alone is not None:
        text, compiled = alone
        return Namespace(spec.namespace, spec.origin, text, _targets(compiled, spec), compiled=compiled)
    compiled = compile_spec(spec, externals)
    targets = _targets(compiled, spec)
    try:
        parsed = parse(spec.text, spec.path)
        text, error = parsed.text, None
    except Exception as exc:  # yaramod raises its own ParserError and sometimes RuntimeError
        parsed, text, error = None, None, str(exc)
    return Namespace(spec.namespace, spec.origin, text, targets, error, parsed, compiled)


def load_rules(
    rule: RuleText | None = None, path: RulePaths | None = None, externals: Externals | None = None
) -> RuleSource:
    """Rule text or rule files (see rule_specs), each namespace compiled and with its inlined source;
    RuleError when YARA refuses one."""
    externals = dict(externals or {})
    return RuleSource(tuple(load_namespace(s, externals) for s in rule_specs(rule, path)), externals)


def _targets(compiled: yara.Rules, spec: Spec) -> tuple[str, ...]:
    """The rules a search reports: the public ones, in file order (every one when none is public)."""
    all_rules = list(compiled)
    if not all_rules:
        raise RuleError(f"{spec.path}: no rules in file" if spec.path is not None else "no rules in the text")
    public = tuple(r.identifier for r in all_rules if not r.is_private)
    return public or tuple(r.identifier for r in all_rules)


def load_for_search(
    rule: RuleText | None,
    path: RulePaths | None,
    note: Callable[[str], None],
    externals: Externals | None = None,
) -> tuple[RuleSource, float]:
    """`load_rules`, timed (ms), telling `note` when yaramod cannot parse what YARA compiled."""
    started = time.perf_counter()
    source = load_rules(rule, path, externals)
    for namespace in source.namespaces:
        if namespace.parse_error:
            note(
                f"yaramod cannot parse {namespace.origin}, so every document is a candidate of its rules "
                f"(verification decides): {namespace.parse_error}"
            )
    return source, (time.perf_counter() - started) * 1000
