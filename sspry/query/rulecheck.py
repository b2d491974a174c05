"""`sspry rule-check`: how each rule of rule files would be searched, and what only verification decides.

Per rule: a status (`searchable`: every part of the condition narrows the search -- the index holds what
each part needs, so no part is left to verification alone; `searchable-needs-verify`: the plan narrows,
but some parts became TRUE; `unsearchable`: every document is a candidate), each string with the grams
chosen for it, and the findings (stable codes from ruleplan.CODES with the rule file's line and column,
the text they are about and a hint from ruleplan.HINTS). Candidates of a `searchable` rule are still only
possible matches: blooms admit false positives, and counts and offsets of strings are checked by
verification.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from sspry.engines import qualified_name
from sspry.policy import Policy
from sspry.query.externals import Externals
from sspry.query.plan import TRUE, Field, Gram, leaves
from sspry.query.ruleplan import CODES, HINTS, RulePlan
from sspry.query.rules import RuleError, RulePaths, RuleText, Spec, judged, parse, rule_names, rule_specs
from sspry.query.ruleset import plan_rules
from sspry.query.runs import describe

STATUS_ORDER = ("searchable", "searchable-needs-verify", "unsearchable")
SEARCHABLE_SUMMARY = (
    "every part of the condition narrows the search; candidates may still not match "
    "(bloom false positives; string counts and offsets are checked by --verify)"
)


@dataclass
class RuleReport:
    plan: RulePlan
    private: bool
    string_texts: dict[str, str] = field(default_factory=dict)  # identifier -> the string as written

    @property
    def status(self) -> str:
        if self.plan.upper is TRUE:
            return "unsearchable"
        return "searchable-needs-verify" if self.plan.notes else "searchable"

    @property
    def has_problems(self) -> bool:
        """Something for a rule author to look at (a string without grams is also a note)."""
        return self.status != "searchable"

    def to_json(self) -> dict:
        strings = []
        for string in self.plan.strings:
            grams = leaves(string.node, Gram)
            strings.append(
                {
                    "id": string.identifier,
                    "text": self.string_texts.get(string.identifier),
                    "line": string.line,
                    "grams": {
                        f"tier{tier}": sorted(g.gram.hex() for g in grams if g.tier == tier)
                        for tier in (1, 2)
                    },
                    "runs": sorted(filter(None, (describe(f) for f in leaves(string.node, Field)))),
                    "note": string.note,
                }
            )
        return {
            "rule": self.plan.name,
            "private": self.private,
            "status": self.status,
            "strings": strings,
            "notes": [
                {
                    "code": n.code,
                    "message": CODES[n.code],
                    "hint": HINTS[n.code],
                    "text": n.text,
                    "line": n.line,
                    "column": n.column,
                }
                for n in self.plan.notes
            ],
        }


def check_rules(
    policy: Policy,
    max_anchors: int,
    rule: RuleText | None = None,
    path: RulePaths | None = None,
    externals: Externals | None = None,
) -> list[RuleReport]:
    """Reports for every rule of the rule text or files (exactly one, as rules.rule_specs takes them),
    namespace by namespace in file order (a rule named `namespace:rule` when there are several), with
    `externals` planned as constants."""
    specs = rule_specs(rule, path)
    reports = []
    for spec in specs:
        for report in _check_namespace(spec, policy, max_anchors, externals):
            if len(specs) > 1:
                report.plan = replace(report.plan, name=qualified_name(spec.namespace, report.plan.name))
            reports.append(report)
    return reports


def _check_namespace(
    spec: Spec, policy: Policy, max_anchors: int, externals: Externals | None
) -> list[RuleReport]:
    engine, compiled = judged(spec, externals)  # RuleError names the file and line
    texts: dict[str, dict[str, str]] = {}
    try:
        parsed = parse(spec.text, spec.path, externals)  # the file itself, so lines are the file's own
        for parsed_rule in parsed.rules:
            texts[parsed_rule.name] = {s.identifier: s.text for s in parsed_rule.strings}
        private = {rule.name for rule in parsed.rules if rule.is_private}
    except Exception as exc:
        parsed, private = None, set()
        error = str(exc)
    names = rule_names(engine, compiled, lambda: private)
    if not names:
        raise RuleError(f"{spec.origin}: no rules in it")
    plans = plan_rules(parsed, [n for n, _ in names], policy, max_anchors, externals=externals)
    if parsed is None:
        for plan in plans:
            plan.notes[0].text = error
    return [
        RuleReport(plan, private, texts.get(name, {}))
        for plan, (name, private) in zip(plans, names, strict=True)
    ]


def check_rule_file(
    path: RulePaths, policy: Policy, max_anchors: int, externals: Externals | None = None
) -> list[RuleReport]:
    return check_rules(policy, max_anchors, path=path, externals=externals)


def file_status(reports: list[RuleReport]) -> str:
    """The worst status of the public rules (of every rule when none is public)."""
    considered = [r for r in reports if not r.private] or reports
    return max((r.status for r in considered), key=STATUS_ORDER.index)


def status_counts(reports: list[RuleReport]) -> dict[str, int]:
    """How many rules have each status (every status listed, zeros included)."""
    found = Counter(r.status for r in reports)
    return {status: found[status] for status in STATUS_ORDER}


def fails(reports: list[RuleReport], fail_on: str) -> bool:
    """Whether a public rule has status `fail_on` or a worse one (`--fail-on`)."""
    worst = STATUS_ORDER.index(fail_on)
    return any(STATUS_ORDER.index(r.status) >= worst for r in reports if not r.private)


def format_text(
    policy_source: str, policy: Policy, reports: list[RuleReport], only_problems: bool = False
) -> str:
    """The plain report: a header with the file's status and the counts by status, then each rule (with
    `only_problems`, only the rules that have something to look at)."""
    counts = ", ".join(f"{n} {status}" for status, n in status_counts(reports).items())
    lines = [
        f"status: {file_status(reports)}",
        f"policy_source: {policy_source}",
        f"id_source: {policy.id_source}",
        f"gram_sizes: {policy.gram_sizes[0]},{policy.gram_sizes[1]}",
        f"rules: {len(reports)} ({counts})",
    ]
    for report in reports:
        if only_problems and not report.has_problems:
            continue
        data = report.to_json()
        lines.append("")
        lines.append(f"rule: {data['rule']}")
        if data["private"]:
            lines.append("private: true")
        lines.append(f"status: {data['status']}")
        for string in data["strings"]:
            counts = ", ".join(f"{tier} {len(grams)} grams" for tier, grams in string["grams"].items())
            shown = f" = {string['text']}" if string["text"] else ""
            runs = f"; runs: {' or '.join(string['runs'])}" if string["runs"] else ""
            lines.append(f"  string {string['id']}{shown} (line {string['line']}): {counts}{runs}")
        for note in data["notes"]:
            lines.append(f"  {note['line']}:{note['column']} {note['code']}: {note['text']}")
            lines.append(f"    why: {note['message']}")
            lines.append(f"    hint: {note['hint']}")
    if any(r.status == "searchable" for r in reports):
        lines += ["", f"searchable: {SEARCHABLE_SUMMARY}"]
    return "\n".join(lines)
