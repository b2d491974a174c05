"""A rule file (yaramod) -> one RulePlan per target rule: rule references, global rules, and the entry
points `iter_plans` / `plan_rules`.

A rule as other rules see it (`2 of (a, b)`, `a and ...`) is its condition's Approx, never undefined; a
rule as matched is that and every global rule of the file. A rule that fails to plan plans as TRUE with a
`plan-error` note and never fails the others; a file yaramod cannot parse plans every rule as TRUE.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import yaramod

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.condition import ConditionPlanner, where
from sspry.query.literals import DEFAULT_MAX_ANCHORS, GramMapper
from sspry.query.plan import TRUE, UNKNOWN, Approx, and_
from sspry.query.ruleplan import Note, RulePlan
from sspry.query.rules import yaramod_parser
from sspry.query.strings import plan_string


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
        """The rule's condition as other rules see it: matched or not, never undefined."""
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
                self._approx[name] = ConditionPlanner(self, plan).plan(rule.condition).defined()
            except Exception as exc:  # one rule failing to plan never fails the others
                plan.notes.append(Note(name, "plan-error", f"{type(exc).__name__}: {exc}", *where(rule)))
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


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while planning a rule. Planning allocates many small objects that
    live on (interned plan nodes), and the collector traversed them again and again: a fifth of the
    time of a large bundle. Plans form no cycles; collection resumes once every planning thread is out."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


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
    with gc_paused():  # until the last plan is out, or the caller closes the iterator
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
