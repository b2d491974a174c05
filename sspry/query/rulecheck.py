"""`sspry rule-check`: how each rule of a file would be searched, and what only verification decides.

Per rule: a status (`searchable`: the plan prunes and nothing was left to verification;
`searchable-needs-verify`: the plan prunes, but parts of the condition became TRUE; `unsearchable`:
every document is a candidate), the grams chosen for each string, and the notes (stable codes from
ruleplan.CODES, with the rule file's line and column).
"""

from __future__ import annotations

from dataclasses import dataclass

from sspry.policy import Policy
from sspry.query.plan import TRUE, Gram, leaves
from sspry.query.ruleplan import CODES, RulePlan
from sspry.query.rules import RuleError, compile_rules, compile_text, parse
from sspry.query.ruleset import plan_rules

STATUS_ORDER = ("searchable", "searchable-needs-verify", "unsearchable")


@dataclass
class RuleReport:
    plan: RulePlan
    private: bool

    @property
    def status(self) -> str:
        if self.plan.upper is TRUE:
            return "unsearchable"
        return "searchable-needs-verify" if self.plan.notes else "searchable"

    def to_json(self) -> dict:
        strings = []
        for string in self.plan.strings:
            grams = leaves(string.node, Gram)
            strings.append(
                {
                    "id": string.identifier,
                    "line": string.line,
                    "grams": {
                        f"tier{tier}": sorted(g.gram.hex() for g in grams if g.tier == tier)
                        for tier in (1, 2)
                    },
                    "note": string.note,
                }
            )
        return {
            "rule": self.plan.name,
            "private": self.private,
            "status": self.status,
            "strings": strings,
            "notes": [
                {"code": n.code, "message": CODES[n.code], "text": n.text, "line": n.line, "column": n.column}
                for n in self.plan.notes
            ],
        }


def check_rules(
    policy: Policy, max_anchors: int, rule: str | None = None, path: str | None = None
) -> list[RuleReport]:
    """Reports for every rule of the rule text or file (exactly one), in file order."""
    if (rule is None) == (path is None):
        raise ValueError("give the rule text (rule=) or a rule file (path=), not both")
    compiled = compile_rules(path) if path is not None else compile_text(rule)  # RuleError: file and line
    names = [(r.identifier, r.is_private) for r in compiled]
    if not names:
        raise RuleError(f"{path}: no rules in file" if path is not None else "no rules in the text")
    try:
        parsed = parse(rule, path)  # the file itself, so lines are the file's own
    except Exception as exc:
        parsed = None
        error = str(exc)
    plans = plan_rules(parsed, [n for n, _ in names], policy, max_anchors)
    if parsed is None:
        for plan in plans:
            plan.notes[0].text = error
    return [RuleReport(plan, private) for plan, (_, private) in zip(plans, names, strict=True)]


def check_rule_file(path: str, policy: Policy, max_anchors: int) -> list[RuleReport]:
    return check_rules(policy, max_anchors, path=path)


def file_status(reports: list[RuleReport]) -> str:
    """The worst status of the public rules (of every rule when none is public)."""
    considered = [r for r in reports if not r.private] or reports
    return max((r.status for r in considered), key=STATUS_ORDER.index)


def format_text(path: str, policy_source: str, policy: Policy, reports: list[RuleReport]) -> str:
    lines = [
        f"status: {file_status(reports)}",
        f"policy_source: {policy_source}",
        f"id_source: {policy.id_source}",
        f"gram_sizes: {policy.gram_sizes[0]},{policy.gram_sizes[1]}",
        f"rules: {len(reports)}",
    ]
    for report in reports:
        data = report.to_json()
        lines.append("")
        lines.append(f"rule: {data['rule']}")
        if data["private"]:
            lines.append("private: true")
        lines.append(f"status: {data['status']}")
        for string in data["strings"]:
            counts = ", ".join(f"{tier} {len(grams)} grams" for tier, grams in string["grams"].items())
            detail = f" ({string['note']})" if string["note"] else ""
            lines.append(f"  string {string['id']}: {counts}{detail}")
        for note in data["notes"]:
            lines.append(
                f"  {note['code']} at {note['line']}:{note['column']}: {note['text']} -- {note['message']}"
            )
        if data["status"] == "searchable":
            lines.append("  summary: every part of the condition is decided by the index")
    return "\n".join(lines)
