"""One rule's condition (yaramod AST) -> an Approx plan, conservatively.

Every boolean expression becomes an `Approx(upper, lower, undefined)` (see plan.py); `upper` of the whole
condition selects the candidates. Value expressions first become terms (terms.py), and comparisons between
terms become facts when they can be decided from what a segment stores: the file size, the first bytes,
the entry-point bytes, YARA's module fields, the entropy, the Source ID. Strings contribute their gram
formulas. Whatever is left is UNKNOWN (TRUE, FALSE) and recorded as a `Note` with a stable code and a
location.

Both walks dispatch on the exact yaramod type (`_TERMS`, `_CONDITIONS`): a type without an entry is
not understood, which means "maybe", never an error and never FALSE.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING

import yaramod

from sspry.document import ENTRY_BYTES
from sspry.features import xmodules
from sspry.features.metadata import MODULES, constants
from sspry.query import moduledefs
from sspry.query.literals import fold_case, literal, map_sets, pattern_plan
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
    field_present,
    not_,
    or_,
)
from sspry.query.ruleplan import Note, RulePlan
from sspry.query.strings import StringPlan, literal_text
from sspry.query.terms import (
    DEFINED_TERMS,
    FLIP,
    READS,
    Const,
    Counts,
    EntryOffset,
    MaskedField,
    ModuleField,
    Now,
    OfString,
    Read,
    Size,
    Term,
    Text,
    WholeEntropy,
    WholeHash,
    arithmetic,
    counts_needed,
    entry_offset,
    holds,
    int_literal,
    is_int,
    negate,
    solve_filesize,
)

if TYPE_CHECKING:
    from sspry.query.ruleset import RulesetPlanner

_COMPARISONS = {
    yaramod.LtExpression: "<",
    yaramod.LeExpression: "<=",
    yaramod.GtExpression: ">",
    yaramod.GeExpression: ">=",
    yaramod.EqExpression: "==",
    yaramod.NeqExpression: "!=",
}
_ARITHMETIC = {yaramod.PlusExpression: "+", yaramod.MinusExpression: "-", yaramod.MultiplyExpression: "*"}
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


def where(item) -> tuple[int, int]:
    """Line and column of a yaramod rule or expression (0, 0 when it has none)."""
    try:
        location = item.token_first.location if hasattr(item, "token_first") else item.location
        return location.begin.line, location.begin.column
    except Exception:
        return 0, 0


class ConditionPlanner:
    """Plans one rule's condition; other rules are asked of the ruleset planner by name."""

    def __init__(self, ruleset: RulesetPlanner, plan: RulePlan):
        self.ruleset = ruleset
        self.policy = ruleset.policy
        self.rule_plan = plan
        self.by_id = {s.identifier: s for s in plan.strings if s.identifier != "$"}
        self.bound: StringPlan | None = None  # what `$` stands for inside `for ... of ... : (...)`

    def unknown(self, expr, code: str) -> Approx:
        note = Note(self.rule_plan.name, code, expr.text, *where(expr))
        if note not in self.rule_plan.notes:  # a loop body is planned once per string: say it once
            self.rule_plan.notes.append(note)
        return UNKNOWN

    # --- conditions ----------------------------------------------------------------------------
    def plan(self, expr) -> Approx:
        handler = _CONDITIONS.get(type(expr))
        if handler is not None:
            return handler(self, expr)
        if isinstance(expr, _STRING_OPERATORS):
            return self.unknown(expr, "string-operator")
        return self.unknown(expr, "not-understood")

    def _and_or(self, expr) -> Approx:
        kind = type(expr)
        operands, stack = [], [expr]
        while stack:  # long chains are left-deep: flatten without recursion
            item = stack.pop()
            if type(item) is kind:
                stack.extend((item.right_operand, item.left_operand))
            else:
                operands.append(self.plan(item))
        if len(operands) == 1:
            return operands[0]
        # the chain's bounds in one And/Or each (as folding Approx & / | pairwise gives, without an
        # intermediate node per operand)
        combine = and_ if kind is yaramod.AndExpression else or_
        return Approx(combine(*(o.upper for o in operands)), combine(*(o.lower for o in operands)), FALSE)

    def _not(self, expr) -> Approx:
        inner = self.plan(expr.operand)
        if inner.lower is FALSE and inner.upper is not TRUE:
            self.unknown(expr, "negated-string")
        return ~inner

    def _parentheses(self, expr) -> Approx:
        return self.plan(expr.enclosed_expr)

    def _bool(self, expr) -> Approx:
        return Approx.exact(TRUE if expr.value else FALSE)

    def _string(self, expr) -> Approx:
        return self.string(expr.id)

    def _string_at(self, expr) -> Approx:
        return self.located(expr, [self.term(expr.at_expr)])

    def _string_in(self, expr) -> Approx:
        low, high = self.term(expr.range_expr.low), self.term(expr.range_expr.high)
        if isinstance(low, Const) and isinstance(high, Const) and 0 <= high.value - low.value < 64:
            return self.located(expr, [Const(o) for o in range(int(low.value), int(high.value) + 1)])
        return self.undefined_with(self.string(expr.id), [low, high])

    def _of(self, expr) -> Approx:
        items = self.members(expr.iterable)
        if items is None:
            return self.unknown(expr, "not-understood")
        # `at`/`in` narrow nothing here (a string found there is found), but may be undefined
        return self.undefined_with(self.quantified(expr, items), self.location_terms(expr.location))

    def _identifier(self, expr) -> Approx:
        if expr.text in self.ruleset.externals:  # a boolean (or number) the caller gave: a constant
            return Approx.exact(TRUE if self.ruleset.externals[expr.text] else FALSE)
        if expr.text in self.ruleset.rules:
            return self.ruleset.approx(expr.text)
        return self._integer(expr)

    def _integer(self, expr) -> Approx:
        """An integer used as a boolean: true when not zero."""
        term = self.term(expr)
        if isinstance(term, ModuleField):
            return self.field(term.name, "!=", 0)
        if isinstance(term, MaskedField):
            return self.field(term.name, "&", term.mask)
        return self.unknown(expr, _module_code(expr.text))

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
        pe.entry_point for ELF files: `entry_field`). A match longer than the stored window must still
        start with the window's bytes (a file too short for the match holds none), so each sequence is
        cut to the window: then the test is necessary, no longer sufficient, and the string's grams
        still apply."""
        plan = self.string_plan(identifier)
        if plan is None:
            return UNKNOWN
        undefined = FALSE if source == "prefix" else TRUE
        window = self.policy.prefix_bytes if source == "prefix" else ENTRY_BYTES
        starts = {}
        for offset in offsets:
            found = plan.starts(window - offset) if 0 <= offset < window else None
            if found is None:
                return Approx.maybe(plan.node, undefined)
            starts[offset] = found
        if sum(len(seqs) for seqs, _ in starts.values()) > 64:
            return Approx.maybe(plan.node, undefined)
        fact = or_(*(BytesAt(source, o, seq) for o, (seqs, _) in starts.items() for seq in sorted(seqs)))
        if entry_field is not None:
            fact = and_(fact, field_present(entry_field))
        cut = not all(whole for _, whole in starts.values())
        sure = FALSE if plan.fullword or cut else fact  # fullword also wants delimiters around the match
        if source == "entry":  # entry-point bytes come from YARA's modules: unknown where they did not run
            fact = or_(fact, Unscanned())
        return Approx(and_(fact, plan.node) if cut else fact, sure, undefined)

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

    def located(self, expr, locations: list[Term | None]) -> Approx:
        """`$a at X` / `$a in (X..Y)`: decided from stored bytes when they cover every place."""
        if all(is_int(t) for t in locations):
            return self.string_at(expr.id, [t.value for t in locations], "prefix")  # type: ignore[union-attr]
        term = entry_offset(locations[0]) if len(locations) == 1 else None
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

    # --- loops ---------------------------------------------------------------------------------
    def _for_strings(self, expr) -> Approx:
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

    def _for_values(self, expr) -> Approx:
        """`for Q i in (...) : (BODY)`: with Q = any or n >= 1, some iteration's BODY holds, so the range
        is not empty (`for any i in (1..#a)` needs $a), and whatever BODY forces for every value of i
        holds (i itself is unknown: terms using it are not constant). `all` and `none` may hold
        vacuously on an empty range: unknown."""
        variable = expr.variable
        if isinstance(variable, yaramod.AllExpression | yaramod.NoneExpression):
            return self.unknown(expr, "vacuous-loop")
        if not isinstance(variable, yaramod.AnyExpression):
            k = self.constant(variable)
            if not isinstance(k, int) or k < 1:
                return self.unknown(expr, "vacuous-loop")
        body = self.plan(expr.body).upper
        return Approx.maybe(and_(body, self.range_needs(expr.iterable)), undefined=FALSE)  # never undefined

    def range_needs(self, iterable) -> Node:
        """What `(LOW..HIGH)` needs to hold a value, when HIGH counts strings and LOW is a constant."""
        if not isinstance(iterable, yaramod.RangeExpression):
            return TRUE
        low, high = self.term(iterable.low), self.term(iterable.high)
        if isinstance(high, Counts) and isinstance(low, Const):
            return counts_needed(high, ">=", low)
        return TRUE

    # --- module fields and functions -----------------------------------------------------------
    def field(self, name: str, op: str, value: int) -> Approx:
        """A module field compared: undefined where the file does not have the field, unknown where its
        module did not run (yara-python could not scan the file; the yara-x modules were not run on it)."""
        return exact_or_unknown(Field(name, op, value), _not_run(name), not_(field_present(name)))

    def _function(self, expr) -> Approx:
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
        self.rule_plan.notes.append(Note(self.rule_plan.name, "import-names", expr.text, *where(expr)))
        return Approx.maybe(and_(*required))

    # --- comparisons ---------------------------------------------------------------------------
    def _comparison(self, expr) -> Approx:
        op = _COMPARISONS[type(expr)]
        left, right = self.term(expr.left_operand), self.term(expr.right_operand)
        if isinstance(left, Const | Text) and not isinstance(right, Const | Text):
            left, right, op = right, left, FLIP[op]
        if type(left) is type(right) and isinstance(left, Const | Text):  # two constants (externals)
            return Approx.exact(TRUE if holds(left.value, op, right.value) else FALSE)  # type: ignore[union-attr]
        if isinstance(right, Counts) and not isinstance(left, Counts):
            left, right, op = right, left, FLIP[op]
        if isinstance(left, Counts) and isinstance(right, Counts | Const):
            return self.counts(expr, left, op, right)
        if isinstance(left, OfString):  # defined only where the string matched
            return Approx.maybe(left.string.upper)
        if isinstance(right, OfString):
            return Approx.maybe(right.string.upper)
        if isinstance(left, Size) and isinstance(right, Const):
            return Approx.exact(solve_filesize(left, op, right.value))
        if isinstance(left, ModuleField) and is_int(right):
            return self.field(left.name, op, right.value)  # type: ignore[union-attr]
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
        if isinstance(left, Read) and is_int(right):
            return self.read(expr, left, op, right.value)  # type: ignore[union-attr]
        for operand in (expr.left_operand, expr.right_operand):
            if _MODULE_VALUE.match(operand.text):  # pe.imphash(), pe.sections[0].name, cuckoo.x, ...
                return self.unknown(expr, _module_code(operand.text))
        return self.unknown(expr, "non-constant")

    def counts(self, expr, left: Counts, op: str, right: Counts | Const) -> Approx:
        """`#a OP n`, `#a > #b + 2`, `(#a + #b) > (#c + #d)`: a string of a side must occur where the
        comparison rules out that side's strings all being absent (terms.counts_needed). Counts are
        always defined."""
        needed = counts_needed(left, op, right)
        if isinstance(right, Counts):
            needed = and_(needed, counts_needed(right, FLIP[op], left))
        if needed is TRUE:
            self.unknown(expr, "count-may-be-zero")
            return UNKNOWN
        return Approx.maybe(needed, undefined=FALSE)

    def time_now(self, expr, left: Term | None, op: str, right: Term | None) -> Approx:
        """time.now at verification is at least the search's start, T. A comparison is planned as what
        some now >= T allows: `x > now` needs x > T, `x >= now` and `x == now` need x >= T; `x < now`
        and the like become true as time passes, so only verification decides them."""
        self.ruleset.uses_now.add(self.rule_plan.name)  # such a plan is never cached
        if isinstance(left, Now):
            left, right, op = right, left, FLIP[op]
        if op in (">", ">=", "=="):
            bound = ">" if op == ">" else ">="
            if isinstance(left, ModuleField):
                return Approx.maybe(self.field(left.name, bound, self.ruleset.now).upper)
            if isinstance(left, Const):
                return Approx.maybe(TRUE if holds(left.value, bound, self.ruleset.now) else FALSE)
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
        width, signed, big = READS[read.function]
        mask = read.mask & ((1 << (8 * width)) - 1)
        window = self.policy.prefix_bytes if read.source == "prefix" else ENTRY_BYTES
        if read.source is not None and read.offset is not None and 0 <= read.offset <= window - width:
            fact = ReadInt(read.source, read.offset, width, signed, big, mask, op, value)
            if read.source == "prefix":  # undefined past the end of the file, where `fact` is FALSE
                return exact_or_unknown(fact, FALSE, Filesize("<", read.offset + width))
            # and at an entry point that is not there
            if read.entry_field is not None:
                fact = and_(fact, field_present(read.entry_field))
            return exact_or_unknown(fact, Unscanned(), TRUE)
        if (
            op == "=="
            and mask == (1 << (8 * width)) - 1
            and -(1 << (8 * width - 1)) <= value < (1 << (8 * width))
        ):
            data = (value % (1 << (8 * width))).to_bytes(width, "big" if big else "little")
            grams = self.ruleset.mapper.seq(literal(data).seq)
            if grams is TRUE:
                return self.unknown(expr, "read-offset")
            return Approx.maybe(grams)
        return self.unknown(expr, "read-offset")

    # --- terms ---------------------------------------------------------------------------------
    def constant(self, expr) -> int | float | None:
        term = self.term(expr)
        return term.value if isinstance(term, Const) else None

    def term(self, expr) -> Term | None:
        """The value of an expression as a term, or None if it is not one the planner handles."""
        handler = _TERMS.get(type(expr))
        return None if handler is None else handler(self, expr)

    def _int_term(self, expr) -> Term | None:
        value = int_literal(expr.text)
        return None if value is None else Const(value)

    def _double_term(self, expr) -> Term:
        return Const(float(expr.value))

    def _text_term(self, expr) -> Term:
        text = expr.text
        quoted = len(text) >= 2 and text[0] == text[-1] == '"'
        return Text(literal_text(text[1:-1]) if quoted else text.encode())

    def _parentheses_term(self, expr) -> Term | None:
        return self.term(expr.enclosed_expr)

    def _filesize_term(self, expr) -> Term:
        return Size(1, 0)

    def _entrypoint_term(self, expr) -> Term:
        return EntryOffset(0)

    def _minus_term(self, expr) -> Term | None:
        return negate(self.term(expr.operand))

    def _arithmetic_term(self, expr) -> Term | None:
        op = _ARITHMETIC[type(expr)]
        return arithmetic(op, self.term(expr.left_operand), self.term(expr.right_operand))

    def _bitwise_and_term(self, expr) -> Term | None:
        left, right = self.term(expr.left_operand), self.term(expr.right_operand)
        if isinstance(left, Const) and not isinstance(right, Const):
            left, right = right, left
        if isinstance(left, Read) and is_int(right):
            return replace(left, mask=left.mask & right.value)  # type: ignore[union-attr]
        if isinstance(left, ModuleField) and is_int(right):
            return MaskedField(left.name, right.value)  # type: ignore[union-attr]
        if isinstance(left, Const) and isinstance(right, Const):
            return Const(int(left.value) & int(right.value))
        return None

    def _name_term(self, expr) -> Term | None:
        name = expr.text.replace(" ", "")
        if name in self.ruleset.externals:
            value = self.ruleset.externals[name]
            return Text(value.encode()) if isinstance(value, str) else Const(value)
        if name in constants():
            return Const(constants()[name])
        module = name.split(".")[0]
        if module in xmodules.X_MODULES:
            if name in moduledefs.constants():
                return Const(moduledefs.constants()[name])
            return ModuleField(name) if xmodules.plannable(name) else None
        # the sidecar keeps fields at the top level and one level into structures, nothing deeper
        if "[" not in name and module in MODULES and name.count(".") <= 2:
            return ModuleField(name)
        return None

    def _read_term(self, expr) -> Term:
        offset = entry_offset(self.term(expr.argument))
        if is_int(offset):
            return Read(expr.function, "prefix", offset.value)  # type: ignore[union-attr]
        if isinstance(offset, EntryOffset):
            return Read(expr.function, "entry", offset.delta, entry_field=offset.field)
        return Read(expr.function, None, None)

    def _function_term(self, expr) -> Term | None:
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

    def _count_term(self, expr) -> Term:
        return Counts((self.string(expr.id).upper,))

    def _of_string_term(self, expr) -> Term:
        return OfString(self.string(expr.id))


P = ConditionPlanner
# yaramod expression type -> how a boolean of that type is planned (exact types: yaramod's classes are
# matched as they are, never by a base class)
_CONDITIONS = {
    yaramod.AndExpression: P._and_or,
    yaramod.OrExpression: P._and_or,
    yaramod.NotExpression: P._not,
    yaramod.ParenthesesExpression: P._parentheses,
    yaramod.BoolLiteralExpression: P._bool,
    yaramod.StringExpression: P._string,
    yaramod.StringAtExpression: P._string_at,
    yaramod.StringInRangeExpression: P._string_in,
    yaramod.OfExpression: P._of,
    yaramod.ForStringExpression: P._for_strings,
    yaramod.ForArrayExpression: P._for_values,
    yaramod.ForDictExpression: P._for_values,
    yaramod.IdExpression: P._identifier,
    yaramod.StructAccessExpression: P._integer,
    yaramod.BitwiseAndExpression: P._integer,
    yaramod.FunctionCallExpression: P._function,
    **{kind: P._comparison for kind in _COMPARISONS},
}
# yaramod expression type -> the term of a value of that type
_TERMS = {
    yaramod.IntLiteralExpression: P._int_term,
    yaramod.DoubleLiteralExpression: P._double_term,
    yaramod.StringLiteralExpression: P._text_term,
    yaramod.ParenthesesExpression: P._parentheses_term,
    yaramod.FilesizeExpression: P._filesize_term,
    yaramod.EntrypointExpression: P._entrypoint_term,
    yaramod.UnaryMinusExpression: P._minus_term,
    yaramod.PlusExpression: P._arithmetic_term,
    yaramod.MinusExpression: P._arithmetic_term,
    yaramod.MultiplyExpression: P._arithmetic_term,
    yaramod.BitwiseAndExpression: P._bitwise_and_term,
    yaramod.StructAccessExpression: P._name_term,
    yaramod.IdExpression: P._name_term,
    yaramod.IntFunctionExpression: P._read_term,
    yaramod.FunctionCallExpression: P._function_term,
    yaramod.StringCountExpression: P._count_term,
    yaramod.StringOffsetExpression: P._of_string_term,
    yaramod.StringLengthExpression: P._of_string_term,
}
del P


def _not_run(name: str) -> Node:
    """Where the module of field `name` did not run on the file, so the sidecar cannot tell."""
    if name.split(".")[0] in xmodules.X_MODULES:
        return not_(field_present(xmodules.MARK))
    return Unscanned()


_MODULE_VALUE = re.compile(r"[A-Za-z_]\w*\.")  # a module's value or function: module.name...


def _module_code(name: str) -> str:
    module = name.split(".")[0].split("(")[0]
    if module not in (*MODULES, "math", "hash", "time"):
        return "unknown-module"
    if "[" in name:
        return "module-array"
    if "(" in name:
        return "module-function"
    return "module-field"
