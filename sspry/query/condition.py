"""Rule conditions (yaramod AST) -> Approx plans, conservatively.

Every expression becomes an `Approx(upper, lower)`; `upper` of the whole condition selects the
candidates. Strings contribute their gram formula as `upper` (a bloom never proves a string present, so
`lower` is FALSE); `filesize` comparisons are exact. Expressions not handled are UNKNOWN (TRUE, FALSE)
and recorded as notes, so `rule-check` can say what only verification decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaramod

from sspry.policy import Policy
from sspry.query.literals import GramMapper
from sspry.query.plan import FALSE, TRUE, UNKNOWN, Approx, Filesize, Node, and_
from sspry.query.rules import yaramod_parser
from sspry.query.strings import StringPlan, plan_string

DEFAULT_MAX_ANCHORS = 16

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


def int_literal(text: str) -> int | None:
    """Value of a YARA integer literal. yaramod's own `.value` ignores KB/MB (10KB -> 10000, YARA
    means 10240), so the token text is read here."""
    match = _INT.match(text.strip())
    if not match:
        return None
    number, unit = match.groups()
    value = int(number, 0)
    return value * {None: 1, "KB": 1024, "MB": 1 << 20}[unit]


@dataclass
class Note:
    rule: str
    text: str
    reason: str
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

    def __init__(self, yara_file: yaramod.YaraFile, mapper: GramMapper):
        self.rules = {rule.name: rule for rule in yara_file.rules}
        self.order = [rule.name for rule in yara_file.rules]
        self.mapper = mapper
        self._memo: dict[str, RulePlan] = {}
        self._approx: dict[str, Approx] = {}

    def approx(self, name: str) -> Approx:
        if name not in self._approx:
            self._approx[name] = UNKNOWN  # YARA forbids cycles; this only guards the recursion
            self._approx[name] = self._plan_rule(name)
        return self._approx[name]

    def _plan_rule(self, name: str) -> Approx:
        rule = self.rules[name]
        strings = [plan_string(s, self.mapper) for s in rule.strings]
        plan = RulePlan(name, TRUE, strings=strings)
        for s in strings:
            if s.note:
                plan.notes.append(Note(name, s.identifier, s.note))
        approx = ConditionPlanner(self, plan).plan(rule.condition)
        self._memo[name] = plan
        return approx

    def plan(self, name: str) -> RulePlan:
        """The plan of a rule as matched: its own condition and every global rule's."""
        upper = and_(
            self.approx(name).upper,
            *(self.approx(g).upper for g in self.order if g != name and self.rules[g].is_global),
        )
        plan = self._memo[name]
        return RulePlan(name, upper, plan.notes, plan.strings)


class ConditionPlanner:
    def __init__(self, ruleset: RulesetPlanner, plan: RulePlan):
        self.ruleset = ruleset
        self.rule_plan = plan
        self.by_id = {s.identifier: s for s in plan.strings if s.identifier != "$"}
        self.bound: StringPlan | None = None  # what `$` stands for inside `for ... of ... : (...)`

    def unknown(self, expr, reason: str) -> Approx:
        self.rule_plan.notes.append(Note(self.rule_plan.name, expr.text, reason))
        return UNKNOWN

    # --- strings -------------------------------------------------------------------------------
    def string(self, identifier: str) -> Approx:
        """A string reference in any of its forms ($a, #a, @a, !a, or the bound $ of a loop)."""
        name = "$" + identifier[1:]
        plan = self.bound if name == "$" else self.by_id.get(name)
        return UNKNOWN if plan is None else Approx.maybe(plan.node)

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
        if isinstance(iterable, yaramod.IterableExpression):
            names = [e.text for e in iterable.elements]
            if all(isinstance(e, yaramod.IdExpression) for e in iterable.elements) and all(
                n in self.ruleset.rules for n in names
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
            percent = self.integer(variable.operand)
            # YARA rounds the count down; rounding down can only admit more documents.
            return None if percent is None else math.floor(percent * total / 100)
        return self.integer(variable)

    def quantified(self, expr, items: list[Approx]) -> Approx:
        k = self.quantity(expr.variable, len(items))
        if k is None:
            return self.unknown(expr, "quantifier not constant")
        if isinstance(expr.variable, yaramod.NoneExpression):
            return ~Approx.at_least(1, items)
        return Approx.at_least(k, items)

    # --- integers ------------------------------------------------------------------------------
    def integer(self, expr) -> int | None:
        """Constant value of an integer expression, or None."""
        if isinstance(expr, yaramod.IntLiteralExpression):
            return int_literal(expr.text)
        if isinstance(expr, yaramod.ParenthesesExpression):
            return self.integer(expr.enclosed_expr)
        if isinstance(expr, yaramod.UnaryMinusExpression):
            value = self.integer(expr.operand)
            return None if value is None else -value
        return None

    # --- conditions ----------------------------------------------------------------------------
    def plan(self, expr) -> Approx:
        if isinstance(expr, yaramod.AndExpression | yaramod.OrExpression):
            kind = type(expr)
            operands, stack = [], [expr]
            while stack:  # long chains are left-deep: flatten without recursion
                item = stack.pop()
                if isinstance(item, kind):
                    stack.extend((item.right_operand, item.left_operand))
                else:
                    operands.append(self.plan(item))
            result = operands[0]
            for operand in operands[1:]:
                result = (result & operand) if kind is yaramod.AndExpression else (result | operand)
            return result
        if isinstance(expr, yaramod.NotExpression):
            return ~self.plan(expr.operand)
        if isinstance(expr, yaramod.ParenthesesExpression):
            return self.plan(expr.enclosed_expr)
        if isinstance(expr, yaramod.BoolLiteralExpression):
            return Approx.exact(TRUE if expr.value else FALSE)
        if isinstance(expr, yaramod.StringExpression):
            return self.string(expr.id)
        if isinstance(expr, yaramod.StringAtExpression | yaramod.StringInRangeExpression):
            return self.string(expr.id)  # a located match is still a match
        if isinstance(expr, yaramod.OfExpression):
            return self.of(expr)
        if isinstance(expr, yaramod.ForStringExpression):
            return self.for_strings(expr)
        if isinstance(expr, yaramod.IdExpression) and expr.text in self.ruleset.rules:
            return self.ruleset.approx(expr.text)
        op = _COMPARISONS.get(type(expr))
        if op is not None:
            return self.comparison(expr, op)
        return self.unknown(expr, f"{type(expr).__name__} is decided by verification")

    def of(self, expr) -> Approx:
        items = self.members(expr.iterable)
        if items is None:
            return self.unknown(expr, "set not understood")
        return self.quantified(expr, items)

    def for_strings(self, expr) -> Approx:
        """`for Q of SET : (BODY)`: BODY planned once per string with `$` bound to it."""
        strings = self.strings_of(expr.iterable)
        if strings is None:
            return self.unknown(expr, "string set not understood")
        items = []
        saved = self.bound
        try:
            for string in strings:
                self.bound = string
                items.append(self.plan(expr.body))
        finally:
            self.bound = saved
        return self.quantified(expr, items)

    def comparison(self, expr, op: str) -> Approx:
        left, right = expr.left_operand, expr.right_operand
        if self.integer(left) is not None and self.integer(right) is None:
            left, right, op = right, left, _FLIP[op]
        value = self.integer(right)
        if value is None:
            return self.unknown(expr, "comparison with a value only verification knows")
        if isinstance(left, yaramod.FilesizeExpression):
            return Approx.exact(Filesize(op, value))
        if isinstance(left, yaramod.StringCountExpression):
            return self.count(expr, left.id, op, value)
        return self.unknown(expr, f"{type(left).__name__} is decided by verification")

    def count(self, expr, identifier: str, op: str, value: int) -> Approx:
        """`#a OP n`: the string must occur whenever the comparison rules out a count of zero."""
        zero_allowed = {
            "==": value == 0,
            "!=": value != 0,
            "<": value > 0,
            "<=": value >= 0,
            ">": value < 0,
            ">=": value <= 0,
        }[op]
        string = self.string(identifier)
        if zero_allowed:
            self.rule_plan.notes.append(Note(self.rule_plan.name, expr.text, "a count of zero satisfies it"))
            return UNKNOWN
        return Approx.maybe(string.upper)


def make_mapper(policy: Policy, max_anchors: int = DEFAULT_MAX_ANCHORS) -> GramMapper:
    return GramMapper(policy.gram_sizes, max_anchors)


def plan_rules(
    text: str | None, targets: Sequence[str], policy: Policy, max_anchors: int = DEFAULT_MAX_ANCHORS
) -> list[RulePlan]:
    """One plan per target rule. A source yaramod cannot parse plans every rule as TRUE."""
    if text is None:
        return [RulePlan(name, TRUE, [Note(name, "", "rule file not parsed by yaramod")]) for name in targets]
    try:
        yara_file = yaramod_parser().parse_string(text)
    except Exception as exc:  # yaramod.ParserError and occasional RuntimeError
        return [RulePlan(name, TRUE, [Note(name, "", f"yaramod: {exc}")]) for name in targets]
    planner = RulesetPlanner(yara_file, make_mapper(policy, max_anchors))
    plans = []
    for name in targets:
        if name not in planner.rules:
            plans.append(RulePlan(name, TRUE, [Note(name, "", "rule not found by yaramod")]))
        else:
            plans.append(planner.plan(name))
    return plans
