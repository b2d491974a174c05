"""Rule conditions (yaramod AST) -> Approx plans, conservatively.

Every boolean expression becomes an `Approx(upper, lower)` (see plan.py); `upper` of the whole
condition selects the candidates. Value expressions first become `terms` (a constant, a linear function
of filesize, a module field, an integer read at a known offset, a string count, ...), and comparisons
between terms become facts when they can be decided from what a segment stores: the file size, the
first 64 bytes, the 16 entry-point bytes, YARA's module fields, the entropy, the Source ID. Strings
contribute their gram formulas. Whatever is left is UNKNOWN (TRUE, FALSE) and recorded as a `Note` with a
stable code and a location, which is what `sspry rule-check` reports.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import yaramod

from sspry.features.metadata import MODULES, constants
from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.literals import GramMapper, fold_case, literal, map_sets, pattern_plan
from sspry.query.plan import (
    FALSE,
    TRUE,
    UNKNOWN,
    Approx,
    BytesAt,
    Entropy,
    Field,
    Filesize,
    Identity,
    Node,
    ReadInt,
    Unscanned,
    and_,
    exact_or_unknown,
    not_,
    or_,
)
from sspry.query.rules import yaramod_parser
from sspry.query.strings import StringPlan, literal_text, plan_string

DEFAULT_MAX_ANCHORS = 16
ENTRY_WINDOW = 16
ENTRY_FIELDS = ("pe.entry_point", "elf.entry_point")

# Stable codes of the notes the planner leaves where only verification can decide.
CODES = {
    "string-unanchored": "the string forces no gram (too short, or wildcards everywhere)",
    "string-not-understood": "the string's pattern could not be read; it plans as TRUE",
    "negated-string": "a string that must be absent: a bloom can prove absence, never presence",
    "count-may-be-zero": "a string count the condition allows to be zero",
    "vacuous-loop": "`for all`/`none` over a range may hold on an empty range",
    "not-understood": "an expression the planner does not decide",
    "module-array": "module arrays and dictionaries are not in the sidecar",
    "module-function": "a module function the sidecar cannot answer",
    "import-names": "pe.imports/pe.exports planned from the names' grams (any case); verification decides",
    "unknown-module": "a module whose values are not stored",
    "string-operator": "string comparisons (contains, matches, ...) and `defined`",
    "read-offset": "an integer read at an offset that is not stored (or not constant)",
    "hash-other-source": "a hash other than the forest's Source ID hash",
    "time-now": "a comparison with time.now that can change between search and verification",
    "non-constant": "a comparison between values only the file knows",
    "plan-error": "the rule could not be planned; it plans as TRUE",
    "not-parsed": "yaramod could not parse the file; every rule plans as TRUE",
}

_INT = re.compile(r"^(0x[0-9a-fA-F]+|0o[0-7]+|\d+)(KB|MB)?$")
_COMPARISONS = {
    yaramod.LtExpression: "<",
    yaramod.LeExpression: "<=",
    yaramod.GtExpression: ">",
    yaramod.GeExpression: ">=",
    yaramod.EqExpression: "==",
    yaramod.NeqExpression: "!=",
}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_READS = {  # YARA integer read functions: (width, signed, big endian)
    f"{'u' if unsigned else ''}int{bits}{'be' if big else ''}": (bits // 8, not unsigned, big)
    for bits in (8, 16, 32)
    for unsigned in (True, False)
    for big in (False, True)
}
_STRING_OPERATORS = tuple(
    getattr(yaramod, name)
    for name in (
        "ContainsExpression",
        "IcontainsExpression",
        "MatchesExpression",
        "StartsWithExpression",
        "IstartsWithExpression",
        "EndsWithExpression",
        "IendsWithExpression",
        "IequalsExpression",
        "DefinedExpression",
    )
    if hasattr(yaramod, name)
)


def int_literal(text: str) -> int | None:
    """Value of a YARA integer literal. yaramod's own `.value` ignores KB/MB (10KB -> 10000, YARA
    means 10240), so the token text is read here."""
    match = _INT.match(text.strip())
    if not match:
        return None
    number, unit = match.groups()
    value = int(number, 0)
    return value * {None: 1, "KB": 1024, "MB": 1 << 20}[unit]


# --- value terms ------------------------------------------------------------------------------------
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
class Count:
    string: Approx


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
    Const | Text | Size | ModuleField | EntryOffset | Read | Count | OfString | Now | WholeEntropy | WholeHash
)
# Values YARA always defines while scanning a file; every other term may be undefined (a module field
# the file lacks, a read past its end, @a[i] without an i-th match, ...).
DEFINED_TERMS = (Const, Text, Size, Count, Now)


# --- plans ------------------------------------------------------------------------------------------
@dataclass
class Note:
    rule: str
    code: str
    text: str
    line: int = 0
    column: int = 0


@dataclass
class RulePlan:
    name: str
    upper: Node
    notes: list[Note] = field(default_factory=list)
    strings: list[StringPlan] = field(default_factory=list)


class RulesetPlanner:
    """Plans the rules of one parsed file; rule references and globals are resolved by name."""

    def __init__(self, yara_file: yaramod.YaraFile, policy: Policy, mapper: GramMapper, now: float):
        self.rules = {rule.name: rule for rule in yara_file.rules}
        self.globals = [rule.name for rule in yara_file.rules if rule.is_global]
        self.policy = policy
        self.mapper = mapper
        self.now = int(now)
        self._plans: dict[str, RulePlan] = {}
        self._approx: dict[str, Approx] = {}

    def approx(self, name: str) -> Approx:
        if name not in self._approx:
            self._approx[name] = UNKNOWN  # YARA forbids cycles; this only guards the recursion
            rule = self.rules[name]
            plan = RulePlan(name, TRUE)
            self._plans[name] = plan
            try:
                plan.strings = [plan_string(s, self.mapper) for s in rule.strings]
                for s in plan.strings:
                    if s.note:
                        code = (
                            "string-not-understood"
                            if s.note.startswith("not understood")
                            else "string-unanchored"
                        )
                        plan.notes.append(Note(name, code, f"{s.identifier}: {s.note}", s.line, s.column))
                # as other rules see it: matched or not, never undefined
                self._approx[name] = ConditionPlanner(self, plan).plan(rule.condition).defined()
            except Exception as exc:  # one rule failing to plan never fails the others
                plan.notes.append(Note(name, "plan-error", f"{type(exc).__name__}: {exc}", *_where(rule)))
                self._approx[name] = UNKNOWN
        return self._approx[name]

    def plan(self, name: str) -> RulePlan:
        """The plan of a rule as matched: its own condition and every global rule's."""
        upper = and_(
            self.approx(name).upper,
            *(self.approx(g).upper for g in self.globals if g != name),
        )
        plan = self._plans[name]
        return RulePlan(name, upper, plan.notes, plan.strings)


def _where(item) -> tuple[int, int]:
    try:
        location = item.token_first.location if hasattr(item, "token_first") else item.location
        return location.begin.line, location.begin.column
    except Exception:
        return 0, 0


class ConditionPlanner:
    def __init__(self, ruleset: RulesetPlanner, plan: RulePlan):
        self.ruleset = ruleset
        self.policy = ruleset.policy
        self.rule_plan = plan
        self.by_id = {s.identifier: s for s in plan.strings if s.identifier != "$"}
        self.bound: StringPlan | None = None  # what `$` stands for inside `for ... of ... : (...)`

    def unknown(self, expr, code: str) -> Approx:
        self.rule_plan.notes.append(Note(self.rule_plan.name, code, expr.text, *_where(expr)))
        return UNKNOWN

    # --- strings -------------------------------------------------------------------------------
    def string_plan(self, identifier: str) -> StringPlan | None:
        """The string a reference names in any of its forms ($a, #a, @a, !a, or the bound $)."""
        name = "$" + identifier[1:]
        return self.bound if name == "$" else self.by_id.get(name)

    def string(self, identifier: str) -> Approx:
        plan = self.string_plan(identifier)
        return UNKNOWN if plan is None else Approx.maybe(plan.node, undefined=FALSE)

    def string_at(
        self, identifier: str, offsets: list[int], source: str, entry_field: str | None = None
    ) -> Approx:
        """The string matches at one of `offsets` of the stored bytes of `source`. Constant offsets
        are always defined; the entry point is undefined for files that are neither PE nor ELF (and
        pe.entry_point for ELF files: `entry_field`)."""
        plan = self.string_plan(identifier)
        if plan is None:
            return UNKNOWN
        undefined = FALSE if source == "prefix" else TRUE
        window = self.policy.prefix_bytes if source == "prefix" else ENTRY_WINDOW
        if (
            plan.exact is None
            or len(plan.exact) * len(offsets) > 64
            or any(o < 0 or o + len(seq) > window for seq in plan.exact for o in offsets)
        ):
            return Approx.maybe(plan.node, undefined)
        fact = or_(*(BytesAt(source, o, seq) for o in offsets for seq in sorted(plan.exact)))
        if entry_field is not None:
            fact = and_(fact, _present(entry_field))
        sure = FALSE if plan.fullword else fact  # fullword also wants delimiters around the match
        if source == "entry":  # entry-point bytes come from YARA's modules: unknown where they did not run
            return Approx(or_(fact, Unscanned()), sure, undefined)
        return Approx(fact, sure, undefined)

    def strings_of(self, iterable) -> list[StringPlan] | None:
        """The strings a `them` / `($a, $b*)` set names, or None if it is not a string set."""
        if isinstance(iterable, yaramod.ThemExpression):
            return list(self.rule_plan.strings)
        if not isinstance(iterable, yaramod.SetExpression):
            return None
        found: list[StringPlan] = []
        for element in iterable.elements:
            if isinstance(element, yaramod.StringWildcardExpression):
                found.extend(s for s in self.rule_plan.strings if s.identifier.startswith(element.id[:-1]))
            elif isinstance(element, yaramod.StringExpression) and element.id in self.by_id:
                found.append(self.by_id[element.id])
            else:
                return None
        return found

    def members(self, iterable) -> list[Approx] | None:
        """What an `of` counts over: strings, or rules (`2 of (rule_a, rule_b)`)."""
        strings = self.strings_of(iterable)
        if strings is not None:
            return [Approx.maybe(s.node) for s in strings]
        if isinstance(iterable, yaramod.IterableExpression | yaramod.SetExpression):
            names = [e.text for e in iterable.elements]
            if all(
                isinstance(e, yaramod.IdExpression) and e.text in self.ruleset.rules
                for e in iterable.elements
            ):
                return [self.ruleset.approx(n) for n in names]
        return None

    def quantity(self, variable, total: int) -> int | None:
        if isinstance(variable, yaramod.AnyExpression):
            return 1
        if isinstance(variable, yaramod.AllExpression):
            return total
        if isinstance(variable, yaramod.NoneExpression):
            return 0
        if isinstance(variable, yaramod.PercentualExpression):
            percent = self.constant(variable.operand)
            # YARA rounds the count down; rounding down can only admit more documents.
            return None if not isinstance(percent, int) else math.floor(percent * total / 100)
        value = self.constant(variable)
        return value if isinstance(value, int) else None

    def quantified(self, expr, items: list[Approx]) -> Approx:
        k = self.quantity(expr.variable, len(items))
        if k is None:
            return self.unknown(expr, "not-understood")
        if isinstance(expr.variable, yaramod.NoneExpression):
            return ~Approx.at_least(1, items)
        return Approx.at_least(k, items)

    # --- terms ---------------------------------------------------------------------------------
    def constant(self, expr) -> int | float | None:
        term = self.term(expr)
        return term.value if isinstance(term, Const) else None

    def term(self, expr) -> Term | None:
        """The value of an expression as a term, or None if it is not one the planner handles."""
        kind = type(expr)
        if kind is yaramod.IntLiteralExpression:
            value = int_literal(expr.text)
            return None if value is None else Const(value)
        if kind is yaramod.DoubleLiteralExpression:
            return Const(float(expr.value))
        if kind is yaramod.StringLiteralExpression:
            return Text(_string_value(expr))
        if kind is yaramod.ParenthesesExpression:
            return self.term(expr.enclosed_expr)
        if kind is yaramod.FilesizeExpression:
            return Size(1, 0)
        if kind is yaramod.EntrypointExpression:
            return EntryOffset(0)
        if kind is yaramod.UnaryMinusExpression:
            inner = self.term(expr.operand)
            if isinstance(inner, Const):
                return Const(-inner.value)
            if isinstance(inner, Size):
                return Size(-inner.a, -inner.b)
            return None
        if kind in (yaramod.PlusExpression, yaramod.MinusExpression, yaramod.MultiplyExpression):
            return _arithmetic(kind, self.term(expr.left_operand), self.term(expr.right_operand))
        if kind is yaramod.BitwiseAndExpression:
            left, right = self.term(expr.left_operand), self.term(expr.right_operand)
            if isinstance(left, Const) and not isinstance(right, Const):
                left, right = right, left
            if isinstance(left, Read) and isinstance(right, Const) and isinstance(right.value, int):
                return replace(left, mask=left.mask & right.value)
            if isinstance(left, ModuleField) and isinstance(right, Const) and isinstance(right.value, int):
                return MaskedField(left.name, right.value)
            if isinstance(left, Const) and isinstance(right, Const):
                return Const(int(left.value) & int(right.value))
            return None
        if kind is yaramod.StructAccessExpression or kind is yaramod.IdExpression:
            name = expr.text.replace(" ", "")
            if name in constants():
                return Const(constants()[name])
            if "[" not in name and name.split(".")[0] in MODULES:
                return ModuleField(name)
            return None
        if kind is yaramod.IntFunctionExpression:
            offset = self.term(expr.argument)
            if isinstance(offset, ModuleField) and offset.name in ENTRY_FIELDS:
                offset = EntryOffset(0, offset.name)
            if isinstance(offset, Const) and isinstance(offset.value, int):
                return Read(expr.function, "prefix", offset.value)
            if isinstance(offset, EntryOffset):
                return Read(expr.function, "entry", offset.delta, entry_field=offset.field)
            return Read(expr.function, None, None)
        if kind is yaramod.FunctionCallExpression:
            function = expr.function.text
            arguments = [self.term(a) for a in expr.arguments]
            whole_file = arguments == [Const(0), Size(1, 0)]
            if function == "math.entropy" and whole_file:
                return WholeEntropy()
            if function.startswith("hash.") and whole_file:
                return WholeHash(function[len("hash.") :])
            if function == "time.now":
                return Now()
            return None
        if kind is yaramod.StringCountExpression:
            return Count(self.string(expr.id))
        if kind in (yaramod.StringOffsetExpression, yaramod.StringLengthExpression):
            return OfString(self.string(expr.id))
        return None

    # --- conditions ----------------------------------------------------------------------------
    def plan(self, expr) -> Approx:
        kind = type(expr)
        if kind in (yaramod.AndExpression, yaramod.OrExpression):
            operands, stack = [], [expr]
            while stack:  # long chains are left-deep: flatten without recursion
                item = stack.pop()
                if type(item) is kind:
                    stack.extend((item.right_operand, item.left_operand))
                else:
                    operands.append(self.plan(item))
            result = operands[0]
            for operand in operands[1:]:
                result = (result & operand) if kind is yaramod.AndExpression else (result | operand)
            return result
        if kind is yaramod.NotExpression:
            inner = self.plan(expr.operand)
            if inner.lower is FALSE and inner.upper is not TRUE:
                self.unknown(expr, "negated-string")
            return ~inner
        if kind is yaramod.ParenthesesExpression:
            return self.plan(expr.enclosed_expr)
        if kind is yaramod.BoolLiteralExpression:
            return Approx.exact(TRUE if expr.value else FALSE)
        if kind is yaramod.StringExpression:
            return self.string(expr.id)
        if kind is yaramod.StringAtExpression:
            return self.located(expr, [self.term(expr.at_expr)])
        if kind is yaramod.StringInRangeExpression:
            low, high = self.term(expr.range_expr.low), self.term(expr.range_expr.high)
            if isinstance(low, Const) and isinstance(high, Const) and 0 <= high.value - low.value < 64:
                return self.located(expr, [Const(o) for o in range(int(low.value), int(high.value) + 1)])
            return self.undefined_with(self.string(expr.id), [low, high])
        if kind is yaramod.OfExpression:
            items = self.members(expr.iterable)
            if items is None:
                return self.unknown(expr, "not-understood")
            # `at`/`in` narrow nothing here (a string found there is found), but may be undefined
            return self.undefined_with(self.quantified(expr, items), self.location_terms(expr.location))
        if kind is yaramod.ForStringExpression:
            return self.for_strings(expr)
        if kind in (yaramod.ForArrayExpression, yaramod.ForDictExpression):
            return self.for_values(expr)
        if kind is yaramod.IdExpression and expr.text in self.ruleset.rules:
            return self.ruleset.approx(expr.text)
        op = _COMPARISONS.get(kind)
        if op is not None:
            return self.comparison(expr, op)
        if kind is yaramod.FunctionCallExpression:
            return self.function(expr)
        if kind in (yaramod.StructAccessExpression, yaramod.IdExpression, yaramod.BitwiseAndExpression):
            term = self.term(expr)  # an integer used as a boolean: true when not zero
            if isinstance(term, ModuleField):
                return self.field(term.name, "!=", 0)
            if isinstance(term, MaskedField):
                return self.field(term.name, "&", term.mask)
            return self.unknown(expr, _module_code(expr.text))
        if isinstance(expr, _STRING_OPERATORS):
            return self.unknown(expr, "string-operator")
        return self.unknown(expr, "not-understood")

    def located(self, expr, locations: list[Term | None]) -> Approx:
        """`$a at X` / `$a in (X..Y)`: decided from stored bytes when they cover every place."""
        if all(isinstance(t, Const) and isinstance(t.value, int) for t in locations):
            return self.string_at(expr.id, [t.value for t in locations], "prefix")  # type: ignore[union-attr]
        term = locations[0] if len(locations) == 1 else None
        if isinstance(term, ModuleField) and term.name in ENTRY_FIELDS:
            term = EntryOffset(0, term.name)
        if isinstance(term, EntryOffset):
            return self.string_at(expr.id, [term.delta], "entry", term.field)
        return self.undefined_with(self.string(expr.id), locations)

    def location_terms(self, location) -> list[Term | None]:
        """The terms of an `at X` / `in (X..Y)` location (none when there is no location)."""
        if location is None:
            return []
        if isinstance(location, yaramod.RangeExpression):
            return [self.term(location.low), self.term(location.high)]
        return [self.term(location)]

    @staticmethod
    def undefined_with(approx: Approx, terms: list[Term | None]) -> Approx:
        """`approx` where it uses these values: YARA's result is undefined wherever one of them is, so
        it may be undefined anywhere unless each is a value YARA always defines."""
        if all(isinstance(t, DEFINED_TERMS) for t in terms):
            return approx
        return Approx.maybe(approx.upper)  # and never surely true: `lower` did not see the location

    def for_strings(self, expr) -> Approx:
        """`for Q of SET : (BODY)`: BODY planned once per string with `$` bound to it."""
        strings = self.strings_of(expr.iterable)
        if strings is None:
            return self.unknown(expr, "not-understood")
        items = []
        saved = self.bound
        try:
            for string in strings:
                self.bound = string
                items.append(self.plan(expr.body))
        finally:
            self.bound = saved
        return self.quantified(expr, items)

    def for_values(self, expr) -> Approx:
        """`for Q i in (...) : (BODY)`: with Q = any or n >= 1, some iteration's BODY holds, and whatever
        BODY forces for every value of i holds (i itself is unknown: terms using it are not constant).
        `all` and `none` may hold vacuously on an empty range: unknown."""
        variable = expr.variable
        if isinstance(variable, yaramod.AllExpression | yaramod.NoneExpression):
            return self.unknown(expr, "vacuous-loop")
        if not isinstance(variable, yaramod.AnyExpression):
            k = self.constant(variable)
            if not isinstance(k, int) or k < 1:
                return self.unknown(expr, "vacuous-loop")
        return Approx.maybe(self.plan(expr.body).upper, undefined=FALSE)  # a loop is never undefined

    def field(self, name: str, op: str, value: int) -> Approx:
        """A module field compared: undefined where the file does not have the field."""
        return exact_or_unknown(Field(name, op, value), Unscanned(), not_(_present(name)))

    def function(self, expr) -> Approx:
        """Module functions used as booleans."""
        name = expr.function.text
        arguments = list(expr.arguments)
        if name == "pe.is_dll" and not arguments:
            return self.field("pe.characteristics", "&", constants()["pe.DLL"])
        if name == "pe.is_64bit" and not arguments:
            return self.field("pe.opthdr_magic", "==", constants()["pe.IMAGE_NT_OPTIONAL_HDR64_MAGIC"])
        if name == "pe.is_32bit" and not arguments:
            # YARA: "not 64-bit" (any other optional-header magic), for PE files only
            return self.field("pe.opthdr_magic", "!=", constants()["pe.IMAGE_NT_OPTIONAL_HDR64_MAGIC"])
        if name in ("pe.imports", "pe.exports"):
            return self.import_names(expr, arguments)
        return self.unknown(expr, _module_code(name))

    def import_names(self, expr, arguments) -> Approx:
        """pe.imports / pe.exports with name arguments: the names are stored in the file as ASCII (the
        import and export name tables), so each name's grams must be there; case is ignored, which only
        admits more. Ordinal and regex arguments add nothing."""
        required = []
        for argument in arguments:
            term = self.term(argument)
            if isinstance(term, Text) and term.value:
                required.append(pattern_plan(map_sets(literal(term.value), fold_case), self.ruleset.mapper))
        if not required:
            return self.unknown(expr, "module-function")
        self.rule_plan.notes.append(Note(self.rule_plan.name, "import-names", expr.text, *_where(expr)))
        return Approx.maybe(and_(*required))

    def comparison(self, expr, op: str) -> Approx:
        left, right = self.term(expr.left_operand), self.term(expr.right_operand)
        if isinstance(left, Const | Text) and not isinstance(right, Const | Text):
            left, right, op = right, left, _FLIP[op]
        if isinstance(left, Const) and isinstance(right, Const):
            return Approx.exact(TRUE if _holds(left.value, op, right.value) else FALSE)
        if isinstance(left, Count) and isinstance(right, Const):
            return self.count(expr, left.string, op, right.value)
        if isinstance(left, OfString):  # defined only where the string matched
            return Approx.maybe(left.string.upper)
        if isinstance(right, OfString):
            return Approx.maybe(right.string.upper)
        if isinstance(left, Size) and isinstance(right, Const):
            return Approx.exact(_filesize(left, op, right.value))
        if isinstance(left, ModuleField) and isinstance(right, Const) and isinstance(right.value, int):
            return self.field(left.name, op, right.value)
        if isinstance(left, MaskedField) and right == Const(0) and op in ("==", "!="):
            masked = self.field(left.name, "&", left.mask)
            return masked if op == "!=" else ~masked
        if isinstance(left, Now) or isinstance(right, Now):
            return self.time_now(expr, left, op, right)
        if isinstance(left, WholeEntropy) and isinstance(right, Const):
            # YARA's entropy of an empty file is undefined, and `undefined < 1` is false there (its `<`
            # on floats alone turns undefined into false): exact everywhere else, undecided on empty files
            return exact_or_unknown(Entropy(op, float(right.value)), Filesize("==", 0), FALSE)
        if isinstance(left, WholeHash) and isinstance(right, Text) and op in ("==", "!="):
            return self.whole_hash(expr, left.algorithm, op, right.value)
        if isinstance(left, Read) and isinstance(right, Const) and isinstance(right.value, int):
            return self.read(expr, left, op, right.value)
        return self.unknown(expr, "non-constant")

    def count(self, expr, string: Approx, op: str, value) -> Approx:
        """`#a OP n`: the string must occur whenever the comparison rules out a count of zero."""
        if not _holds(0, op, value):
            return Approx.maybe(string.upper, undefined=FALSE)
        self.unknown(expr, "count-may-be-zero")
        return UNKNOWN

    def time_now(self, expr, left: Term, op: str, right: Term) -> Approx:
        """time.now at verification is at least the search's start, T. A comparison is planned as what
        some now >= T allows: `x > now` needs x > T, `x >= now` and `x == now` need x >= T; `x < now`
        and the like become true as time passes, so only verification decides them."""
        if isinstance(left, Now):
            left, right, op = right, left, _FLIP[op]
        if op in (">", ">=", "=="):
            bound = ">" if op == ">" else ">="
            if isinstance(left, ModuleField):
                return Approx.maybe(self.field(left.name, bound, self.ruleset.now).upper)
            if isinstance(left, Const):
                return Approx.maybe(TRUE if _holds(left.value, bound, self.ruleset.now) else FALSE)
        return self.unknown(expr, "time-now")

    def whole_hash(self, expr, algorithm: str, op: str, text: bytes) -> Approx:
        if algorithm != self.policy.id_source:
            return self.unknown(expr, "hash-other-source")
        digest = text.decode("latin-1")
        if len(digest) == 2 * self.policy.id_bytes and re.fullmatch(r"[0-9a-f]*", digest):
            fact: Node = Identity(bytes.fromhex(digest))
        else:
            fact = FALSE  # YARA's digest is lowercase hex of that length: it never equals this text
        empty = Filesize("==", 0)  # YARA's hash of an empty file is undefined, never equal or unequal
        approx = exact_or_unknown(and_(fact, not_(empty)), FALSE, empty)
        return approx if op == "==" else ~approx

    def read(self, expr, read: Read, op: str, value: int) -> Approx:
        """uintXX/intXX(offset) OP value: exact from stored bytes when they cover the read; an equality
        also means the value's bytes occur in the file, which gives grams wherever the read is."""
        width, signed, big = _READS[read.function]
        mask = read.mask & ((1 << (8 * width)) - 1)
        approx = UNKNOWN
        window = self.policy.prefix_bytes if read.source == "prefix" else ENTRY_WINDOW
        if read.source is not None and read.offset is not None and 0 <= read.offset <= window - width:
            fact = ReadInt(read.source, read.offset, width, signed, big, mask, op, value)
            if read.source == "prefix":  # undefined past the end of the file, where `fact` is FALSE
                approx = exact_or_unknown(fact, FALSE, Filesize("<", read.offset + width))
            else:  # and at an entry point that is not there
                if read.entry_field is not None:
                    fact = and_(fact, _present(read.entry_field))
                approx = exact_or_unknown(fact, Unscanned(), TRUE)
        elif (
            op == "=="
            and mask == (1 << (8 * width)) - 1
            and -(1 << (8 * width - 1)) <= value < (1 << (8 * width))
        ):
            data = (value % (1 << (8 * width))).to_bytes(width, "big" if big else "little")
            grams = self.ruleset.mapper.seq(literal(data).seq)
            if grams is TRUE:
                return self.unknown(expr, "read-offset")
            approx = Approx.maybe(grams)
        else:
            return self.unknown(expr, "read-offset")
        return approx


def _present(name: str) -> Node:
    """The file has module field `name` (the sidecar keeps exactly the fields YARA defined)."""
    return or_(Field(name, "==", 0), Field(name, "!=", 0))


def _module_code(name: str) -> str:
    module = name.split(".")[0].split("(")[0]
    if module not in (*MODULES, "math", "hash", "time"):
        return "unknown-module"
    if "[" in name:
        return "module-array"
    return "module-function"


def _string_value(expr) -> bytes:
    text = expr.text
    return literal_text(text[1:-1]) if len(text) >= 2 and text[0] == text[-1] == '"' else text.encode()


def _holds(left, op: str, right) -> bool:
    return {
        "==": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


def _arithmetic(kind, left: Term | None, right: Term | None) -> Term | None:
    if kind is yaramod.MinusExpression:
        if isinstance(right, Const):
            right = Const(-right.value)
        elif isinstance(right, Size):
            right = Size(-right.a, -right.b)
        else:
            return None
        kind = yaramod.PlusExpression
    if kind is yaramod.PlusExpression:
        if isinstance(left, Const) and isinstance(right, Const):
            return Const(left.value + right.value)
        if isinstance(right, Size) and not isinstance(left, Size):
            left, right = right, left
        if isinstance(left, Size) and isinstance(right, Const) and isinstance(right.value, int):
            return Size(left.a, left.b + right.value)
        if isinstance(left, Size) and isinstance(right, Size):
            return Size(left.a + right.a, left.b + right.b)
        if isinstance(right, EntryOffset | ModuleField) and isinstance(left, Const):
            left, right = right, left
        if isinstance(left, ModuleField) and left.name in ENTRY_FIELDS and isinstance(right, Const):
            left = EntryOffset(0, left.name)
        if isinstance(left, EntryOffset) and isinstance(right, Const) and isinstance(right.value, int):
            return EntryOffset(left.delta + right.value, left.field)
        return None
    # multiply
    if isinstance(left, Const) and isinstance(right, Const):
        return Const(left.value * right.value)
    if isinstance(right, Size):
        left, right = right, left
    if isinstance(left, Size) and isinstance(right, Const) and isinstance(right.value, int):
        return Size(left.a * right.value, left.b * right.value)
    return None


def _filesize(size: Size, op: str, value) -> Node:
    """Solve a * filesize + b OP value for filesize (an integer)."""
    a, target = size.a, value - size.b
    if a == 0:
        return TRUE if _holds(0, op, target) else FALSE
    if a < 0:
        a, target, op = -a, -target, _FLIP[op]
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


def make_mapper(policy: Policy, max_anchors: int = DEFAULT_MAX_ANCHORS) -> GramMapper:
    return GramMapper(policy.gram_sizes, max_anchors, policy.fold_case)


def iter_plans(
    source: str | yaramod.YaraFile | None,
    targets: Sequence[str],
    policy: Policy,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    now: float | None = None,
) -> Iterator[RulePlan]:
    """One plan per target rule, in order, from source text (or an already parsed file), yielded as each
    is done (a server reports progress between them). A source yaramod cannot parse plans every rule as
    TRUE."""
    if source is None:
        yield from (RulePlan(name, TRUE, [Note(name, "not-parsed", "")]) for name in targets)
        return
    if isinstance(source, str):
        try:
            source = yaramod_parser().parse_string(source)
        except Exception as exc:  # yaramod.ParserError and occasional RuntimeError
            yield from (RulePlan(name, TRUE, [Note(name, "not-parsed", str(exc))]) for name in targets)
            return
    planner = RulesetPlanner(
        source, policy, make_mapper(policy, max_anchors), time.time() if now is None else now
    )
    for name in targets:
        if name not in planner.rules:
            yield RulePlan(name, TRUE, [Note(name, "not-parsed", "rule not found by yaramod")])
        else:
            yield planner.plan(name)


def plan_rules(
    source: str | yaramod.YaraFile | None,
    targets: Sequence[str],
    policy: Policy,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    now: float | None = None,
    progress: Progress = SILENT,
) -> list[RulePlan]:
    """`iter_plans` as a list, reporting progress per rule."""
    plans = []
    with progress.stage("planning", len(targets), "rule") as stage:
        for plan in iter_plans(source, targets, policy, max_anchors, now):
            plans.append(plan)
            stage.advance()
    return plans
