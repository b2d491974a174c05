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
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import yara
import yaramod

from sspry.engines import qualified_name
from sspry.features.xmodules import X_MODULES
from sspry.query.externals import Externals, declarations

_local = threading.local()

DEFAULT_NAMESPACE = "default"  # YARA's (and yara-x's) namespace of a rule file given alone
RULE_SUFFIXES = (".yar", ".yara")  # the files a directory given as --rule contributes


def yaramod_parser() -> yaramod.Yaramod:
    """This thread's parser (knowing yara-x's macho, dex, lnk and crx: query/moduledefs.py): building one
    loads every module definition (~25 ms), so it is reused."""
    from sspry.query.moduledefs import new_parser

    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = new_parser()
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
    path: str | None = None  # the rule file, when it came from one
    engine: str = "yara"  # the engine that compiles it: "yara-x" when it imports a module only yara-x has
    given: str | None = field(default=None, repr=False)  # the rule text as given, when it came as text

    def spec(self) -> Spec:
        """Where to compile it from: its inlined text, else the text as given, else its file."""
        text = self.text if self.text is not None else self.given
        return Spec(self.name, text, None if text is not None else self.path)


@dataclass(frozen=True)
class RuleSource:
    """The rules of a search: one or more namespaces, and the external variables they are compiled
    with. `targets` names every rule to report, in order (`namespace:rule` when there are several)."""

    namespaces: tuple[Namespace, ...]
    externals: dict = field(default_factory=dict)  # name -> value (-d NAME=VALUE), for YARA and the planner
    loaded: yara.Rules | None = field(default=None, compare=False, repr=False)  # `compiled`, when known

    @property
    def name(self) -> str:
        return ", ".join(ns.origin for ns in self.namespaces)

    def qualify(self, namespace: str, rule: str) -> str:
        """A rule's name in results: `namespace:rule` when more than one namespace is searched."""
        return qualified_name(namespace, rule) if len(self.namespaces) > 1 else rule

    @cached_property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.qualify(ns.name, rule) for ns in self.namespaces for rule in ns.targets)

    @cached_property
    def locate(self) -> dict[str, tuple[Namespace, str]]:
        """A name of `targets` -> its namespace and the rule's own name."""
        return {self.qualify(ns.name, rule): (ns, rule) for ns in self.namespaces for rule in ns.targets}

    @cached_property
    def compiled(self) -> yara.Rules:
        """yara-python's compilation of every namespace it can compile (not those only yara-x can:
        `compiled_x`), in one set, each in its namespace. Compiled when first asked for (verification
        may never need it): each compiled set holds ~8 MB of matching tables however few its rules, so
        loading keeps one only for a source of one file."""
        if self.loaded is not None:
            return self.loaded
        namespaces = [ns for ns in self.namespaces if ns.engine == "yara"]
        specs = [ns.spec() for ns in namespaces]
        if all(spec.text is not None for spec in specs):
            return _compiling(
                lambda: yara.compile(sources={s.namespace: s.text for s in specs}, externals=self.externals),
                self.name,
            )
        if len(specs) == 1:
            return compile_spec(specs[0], self.externals)
        # some file's includes only it can resolve: every file compiled from its path
        paths = {ns.name: ns.path for ns in namespaces}
        return _compiling(lambda: yara.compile(filepaths=paths, externals=self.externals), self.name)

    @cached_property
    def compiled_x(self):
        """yara-x's compilation (an engines.Compiled) of the namespaces only yara-x compiles."""
        from sspry.engines import compile_x_sources

        found = {ns.name: (ns.spec().text, ns.spec().path) for ns in self.namespaces if ns.engine == "yara-x"}
        compiled = compile_x_sources(found, self.externals)
        return replace(compiled, qualified=len(self.namespaces) > 1)


def explain(exc: Exception) -> str:
    """YARA's complaint, with the likely fix when it is a name it does not know."""
    message = str(exc)
    if "undefined identifier" in message:
        message += " (an external variable? give it with -d NAME=VALUE)"
    return message


def _compiling(compile: Callable[[], yara.Rules], origin: str) -> yara.Rules:
    """`compile()`, its errors as RuleError naming the file and line."""
    try:
        return compile()
    except yara.SyntaxError as exc:
        raise RuleError(f"invalid YARA rule: {explain(exc)}") from exc
    except yara.Error as exc:
        raise RuleError(f"{origin}: cannot compile: {explain(exc)}") from exc
    except (ValueError, TypeError) as exc:  # ValueError: a NUL in the text
        raise RuleError(f"{origin}: cannot compile: {exc}") from exc


def compile_spec(spec: Spec, externals: Externals | None = None, includes: bool = True) -> yara.Rules:
    """yara-python's compilation of one namespace's rules, in that namespace, or RuleError naming the
    file and line."""
    externals = dict(externals or {})
    if spec.path is not None and not os.path.isfile(spec.path):
        raise RuleError(f"{spec.path}: rule file not found")
    if spec.path is not None:
        files = {spec.namespace: spec.path}
        return _compiling(
            lambda: yara.compile(filepaths=files, externals=externals, includes=includes), spec.origin
        )
    sources = {spec.namespace: spec.text}
    return _compiling(
        lambda: yara.compile(sources=sources, externals=externals, includes=includes), spec.origin
    )


def judged(spec: Spec, externals: Externals | None = None, includes: bool = True) -> tuple[str, object]:
    """(engine, its compilation) of one namespace: yara-python's, or yara-x's when yara-python refuses
    it and yara-x compiles it with a module only yara-x has (macho, dex, lnk, crx; the file is then
    verified by yara-x whatever --engine says); else RuleError with yara-python's complaint."""
    try:
        return "yara", compile_spec(spec, externals, includes)
    except RuleError as exc:
        compiled = _with_yara_x_modules(spec, externals, includes)
        if compiled is None:
            raise
        del exc
    return "yara-x", compiled


def _with_yara_x_modules(spec: Spec, externals: Externals | None, includes: bool = True):
    """yara-x's compilation of a namespace when it compiles it and imports a module only yara-x has;
    else None."""
    from sspry.engines import EngineError, compile_x_sources

    try:
        compiled = compile_x_sources({spec.namespace: (spec.text, spec.path)}, externals, includes).rules
    except EngineError:
        return None
    return compiled if set(compiled.imports()) & set(X_MODULES) else None  # type: ignore[attr-defined]


def needs_yara_x(path: str, externals: Externals | None = None) -> bool:
    """Whether yara-python refuses a rule file that yara-x compiles with a module only it has."""
    try:
        return judged(Spec(DEFAULT_NAMESPACE, path=path), externals)[0] == "yara-x"
    except RuleError:
        return False


def rule_names(engine: str, compiled, private: Callable[[], set[str]]) -> list[tuple[str, bool]]:
    """(name, private) of every rule of a compilation, in order. yara-x does not say which rules are
    private: `private()` names them (from yaramod's parse)."""
    if engine == "yara":
        return [(r.identifier, r.is_private) for r in compiled]
    hidden = private()
    return [(r.identifier, r.identifier in hidden) for r in compiled]


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


def _self_contained(spec: Spec, externals: Externals | None) -> tuple[str, str, object] | None:
    """(the source, engine, compiled) when it includes nothing and is UTF-8 text, else None."""
    try:
        text = spec.text if spec.path is None else Path(spec.path).read_bytes().decode("utf-8")
        return text, *judged(Spec(spec.namespace, text=text), externals, includes=False)  # type: ignore[return-value]
    except (RuleError, OSError, UnicodeDecodeError):
        return None


def _private(spec: Spec, text: str | None) -> set[str]:
    """The private rules of a namespace, by yaramod's parse (none known when it cannot parse it)."""
    try:
        parsed = yaramod_parser().parse_string(text) if text is not None else parse(spec.text, spec.path)
    except Exception:  # yaramod's ParserError, sometimes RuntimeError
        return set()
    return {rule.name for rule in parsed.rules if rule.is_private}


def load_namespace(spec: Spec, externals: Externals | None = None) -> tuple[Namespace, object]:
    """One namespace compiled (RuleError when YARA refuses it), with its source with includes inlined,
    and its compilation (yara-python's, or yara-x's: `judged`). A file with includes that names
    externals plans as TRUE (yaramod inlines includes only when it parses the file itself, and then
    cannot be told them)."""
    alone = _self_contained(spec, externals)
    if alone is not None:
        text, engine, compiled = alone
        targets = _targets(rule_names(engine, compiled, lambda: _private(spec, text)))
        return Namespace(spec.namespace, spec.origin, text, targets, path=spec.path, engine=engine), compiled
    engine, compiled = judged(spec, externals)
    targets = _targets(rule_names(engine, compiled, lambda: _private(spec, None)))
    try:
        parsed = parse(spec.text, spec.path)
        text, error = parsed.text, None
    except Exception as exc:  # yaramod raises its own ParserError and sometimes RuntimeError
        parsed, text, error = None, None, str(exc)
    namespace = Namespace(
        spec.namespace, spec.origin, text, targets, error, parsed, spec.path, engine, spec.text
    )
    return namespace, compiled


def load_rules(
    rule: RuleText | None = None, path: RulePaths | None = None, externals: Externals | None = None
) -> RuleSource:
    """Rule text or rule files (see rule_specs), each namespace compiled and with its inlined source;
    RuleError when YARA refuses one, or when there is no rule in any. A namespace's compilation is
    kept only when it is the only one (RuleSource.compiled)."""
    externals = dict(externals or {})
    specs = rule_specs(rule, path)
    namespaces, compiled = [], None
    for spec in specs:
        namespace, compiled = load_namespace(spec, externals)
        namespaces.append(namespace)
    if not any(ns.targets for ns in namespaces):
        if len(specs) > 1:
            raise RuleError(f"no rules in any of the {len(specs)} rule files")
        raise RuleError(f"{specs[0].path}: no rules in file" if specs[0].path else "no rules in the text")
    alone = len(specs) == 1 and namespaces[0].engine == "yara"
    return RuleSource(tuple(namespaces), externals, compiled if alone else None)


def _targets(names: list[tuple[str, bool]]) -> tuple[str, ...]:
    """The rules a search reports: the public ones, in file order (every one when none is public)."""
    public = tuple(name for name, private in names if not private)
    return public or tuple(name for name, _ in names)


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
