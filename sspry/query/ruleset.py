"""A rule file (yaramod) -> one RulePlan per target rule: rule references, global rules, and the entry
points `iter_plans` / `plan_rules` (one namespace's source) and `iter_source_plans` (a search's).

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
from dataclasses import replace

import yaramod

from sspry.policy import Policy
from sspry.progress import SILENT, Progress
from sspry.query.condition import ConditionPlanner, where
from sspry.query.externals import Externals, declarations
from sspry.query.literals import DEFAULT_MAX_ANCHORS, GramMapper
from sspry.query.plan import TRUE, UNKNOWN, Approx, and_
from sspry.query.plancache import PlanCache, RuleKeys, context_digest, source_key
from sspry.query.ruleplan import Note, RulePlan
from sspry.query.rules import RELEASE_PARSE_CHARS, RuleSource, release_parser, yaramod_parser
from sspry.query.strings import plan_string


class RulesetPlanner:
    """Plans the rules of one parsed file; rule references and globals are resolved by name."""

    def __init__(
        self,
        yara_file: yaramod.YaraFile,
        policy: Policy,
        mapper: GramMapper,
        now: float,
        externals: Externals | None = None,
    ):
        self.externals = dict(externals or {})  # their placeholder rules are not rules (see externals.py)
        self.rules = {rule.name: rule for rule in yara_file.rules if rule.name not in self.externals}
        self.globals = [name for name, rule in self.rules.items() if rule.is_global]
        self.policy = policy
        self.mapper = mapper
        self.now = int(now)
        self._plans: dict[str, RulePlan] = {}
        self._approx: dict[str, Approx] = {}
        self.uses_now: set[str] = set()  # rules whose plan depends on when the search runs

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
_gc_relaxers = 0
_gc_thresholds = gc.get_threshold()
GC_RELAXED = 1000  # the young generation is collected this many times less often while planning


@contextmanager
def gc_relaxed() -> Iterator[None]:
    """Rare cyclic garbage collection while planning or searching. Both allocate many small objects
    that live on (interned plan nodes; compiled batches, results and their paths), and the collector
    traversed them again and again: a fifth of the time of planning a large bundle, and of the 1,000-rule
    bundle at 100,000 documents (scripts/bench.py) 0.25 of 2.1 s, in compiling its batches and looking up
    its 89,569 candidates' paths. Collection is only made rarer, never stopped, so an iterator left
    unfinished costs nothing but later collections; the thresholds return once every user is out."""
    global _gc_relaxers, _gc_thresholds
    with _gc_lock:
        if _gc_relaxers == 0:
            _gc_thresholds = gc.get_threshold()
            gc.set_threshold(_gc_thresholds[0] * GC_RELAXED, *_gc_thresholds[1:])
        _gc_relaxers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_relaxers -= 1
            if _gc_relaxers == 0:
                gc.set_threshold(*_gc_thresholds)


def make_mapper(policy: Policy, max_anchors: int = DEFAULT_MAX_ANCHORS) -> GramMapper:
    return GramMapper(policy.gram_sizes, max_anchors, policy.fold_case)


def iter_plans(
    source: str | yaramod.YaraFile | None,
    targets: Sequence[str],
    policy: Policy,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    now: float | None = None,
    cache: PlanCache | None = None,
    parsed: yaramod.YaraFile | None = None,
    externals: Externals | None = None,
) -> Iterator[RulePlan]:
    """One plan per target rule, in order, from source text (or an already parsed file), yielded as each
    is done (a server reports progress between them). A source yaramod cannot parse plans every rule as
    TRUE. With a `cache` (and source text), plans it holds are reused and new ones stored in it once the
    iterator is done or closed. `parsed`: yaramod's parse_string of exactly the source text, when the
    caller has it (then it is not parsed again; a parse of a file does not do: its positions are not
    the text's). `externals`: values of external variables, planned as constants (a given `source`
    text is parsed behind their declarations, and so is a given `parsed`)."""
    if source is None:
        yield from (RulePlan(name, TRUE, [Note(name, "not-parsed", "")]) for name in targets)
        return
    if isinstance(source, str) and externals:
        source = declarations(externals) + source
    text = source if isinstance(source, str) else None
    context = (
        context_digest(policy, max_anchors, externals) if cache is not None and text is not None else b""
    )
    if cache is not None and text is not None:
        known = _known_plans(cache, source_key(text, context), targets)
        if known is not None:  # a source seen before, every target cached: not even parsed
            yield from known
            return
    parsed_here = False
    if isinstance(source, str) and parsed is not None:
        source = parsed
    elif isinstance(source, str):
        try:
            source, parsed_here = yaramod_parser().parse_string(source), True
        except Exception as exc:  # yaramod.ParserError and occasional RuntimeError
            yield from (RulePlan(name, TRUE, [Note(name, "not-parsed", str(exc))]) for name in targets)
            return
    planner = RulesetPlanner(
        source, policy, make_mapper(policy, max_anchors), time.time() if now is None else now, externals
    )
    keys = None
    if cache is not None and text is not None:
        keys = RuleKeys(text, source, context)
    cached: dict[bytes, RulePlan] = {}
    if keys is not None:
        wanted = [(keys.key(n), n, keys.line(n)) for n in targets if n in planner.rules]
        cached = cache.get_many((k, n, line) for k, n, line in wanted if k is not None)  # type: ignore[union-attr]
    planned: list[tuple[bytes, RulePlan]] = []
    try:
        with gc_relaxed():  # until the last plan is out, or the caller closes the iterator
            for name in targets:
                if name not in planner.rules:
                    yield RulePlan(name, TRUE, [Note(name, "not-parsed", "rule not found by yaramod")])
                    continue
                key = keys.key(name) if keys is not None else None
                plan = cached.get(key) if key is not None else None
                if plan is None:
                    plan = planner.plan(name)
                    if key is not None:
                        planned.append((key, plan))
                yield plan
    finally:
        if keys is not None and cache is not None and text is not None:
            storable = [
                (key, plan, keys.line(plan.name))
                for key, plan in planned
                if not keys.closure(plan.name) & planner.uses_now
                and not any(n.code == "plan-error" for n in plan.notes)
            ]
            cache.put_many(storable)
            stored = {key for key, _, _ in storable} | set(cached)
            entry = {}
            for name in targets:
                key = keys.key(name) if name in planner.rules else None
                if key in stored:
                    entry[name] = (key, keys.line(name))
            cache.put_source(source_key(text, context), entry)  # type: ignore[arg-type]
        if parsed_here and len(text or "") >= RELEASE_PARSE_CHARS:
            planner = keys = source = None  # type: ignore[assignment]  # the parse's last references
            release_parser()


def _known_plans(cache: PlanCache, key: bytes, targets: Sequence[str]) -> list[RulePlan] | None:
    """Every target's plan from the cache, when the source text was seen and all of them are there."""
    entry = cache.source(key)
    if entry is None or any(name not in entry for name in targets):
        return None
    found = cache.get_many((entry[name][0], name, entry[name][1]) for name in targets)
    if any(entry[name][0] not in found for name in targets):
        return None
    return [found[entry[name][0]] for name in targets]


def iter_source_plans(
    source: RuleSource,
    policy: Policy,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    now: float | None = None,
    cache: PlanCache | None = None,
) -> Iterator[RulePlan]:
    """One plan per rule of `source.targets`, in order: each namespace planned on its own (its global
    rules restrict only its rules, its rule names are its own), a plan named as the search names it."""
    for namespace in source.namespaces:
        plans = iter_plans(
            namespace.text,
            namespace.targets,
            policy,
            max_anchors,
            now,
            cache,
            externals=source.externals,
        )
        for plan in plans:
            name = source.qualify(namespace.name, plan.name)
            yield plan if name == plan.name else replace(plan, name=name)


def plan_rules(
    source: str | yaramod.YaraFile | None,
    targets: Sequence[str],
    policy: Policy,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    now: float | None = None,
    progress: Progress = SILENT,
    cache: PlanCache | None = None,
    parsed: yaramod.YaraFile | None = None,
    externals: Externals | None = None,
) -> list[RulePlan]:
    """`iter_plans` as a list, reporting progress per rule."""
    plans = []
    with progress.stage("planning", len(targets), "rule") as stage:
        for plan in iter_plans(source, targets, policy, max_anchors, now, cache, parsed, externals):
            plans.append(plan)
            stage.advance()
    return plans
