#!/usr/bin/env python3
"""Dump a canonical form of every plan of a rule directory, to compare planners (before/after a change).

Each rule file is compiled by yara-python (for its targets) and planned from yaramod's text of it, with a
fixed `now`. Per rule it writes one line: file, rule, and the plan in full -- the DAG of `upper` in post
order (node type and key, children by index), the notes, and per string its gram formula and exact set --
so two dumps are equal exactly when every plan, note and string plan is. `--digest` prints one sha256 per
rule instead of the full form.

  scripts/plan_dump.py --rules DIR --out FILE [--max-anchors N] [--digest]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from sspry.policy import Policy
from sspry.query.plan import Node
from sspry.query.rules import RuleError, load_rules, yaramod_parser

try:
    from sspry.query.ruleset import plan_rules
except ImportError:  # trees before the planner split kept it in condition.py
    from sspry.query.condition import plan_rules  # type: ignore[no-redef]


def canonical_node(root: Node) -> str:
    """The DAG under `root` in post order: one `type(fields)` per distinct node, children as #index."""
    index: dict[Node, int] = {}  # by node: interned nodes are equal when identical, grams by value
    lines: list[str] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in index:
            continue
        children = [k for k in node.key[1:] if isinstance(k, Node)]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(children) if c not in index)
            continue
        fields = ",".join(f"#{index[k]}" if isinstance(k, Node) else repr(k) for k in node.key[1:])
        index[node] = len(lines)
        lines.append(f"{node.key[0].__name__}({fields})")
    return ";".join(lines)


def canonical_plan(plan) -> str:
    parts = [f"upper={canonical_node(plan.upper)}"]
    parts += [f"note={n.code}|{n.text}|{n.line}|{n.column}" for n in plan.notes]
    for s in plan.strings:
        exact = sorted(s.exact) if s.exact is not None else None
        parts.append(
            f"string={s.identifier}|{canonical_node(s.node)}|{s.note}|{exact}|{s.fullword}|{s.line}|{s.column}"
        )
    return "\t".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", required=True, help="directory of rule files (.yar/.yara, recursive)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-anchors", type=int, default=16)
    parser.add_argument("--digest", action="store_true", help="one sha256 per rule instead of the full form")
    args = parser.parse_args()
    files = sorted(p for p in Path(args.rules).rglob("*") if p.suffix in (".yar", ".yara") and p.is_file())
    policy = Policy()
    rules = 0
    with open(args.out, "w") as out:
        for path in files:
            relative = path.relative_to(args.rules)
            try:
                source = load_rules(path=str(path))
            except RuleError as exc:  # YARA refuses it, or it holds no rules: nothing to plan
                out.write(f"{relative}\t-\t{exc}\n")
                continue
            text = yaramod_parser().parse_file(str(path)).text  # yaramod's text, whatever a search sends
            for plan in plan_rules(text, source.targets, policy, args.max_anchors, now=0):
                text = canonical_plan(plan)
                if args.digest:
                    text = hashlib.sha256(text.encode()).hexdigest()
                out.write(f"{relative}\t{plan.name}\t{text}\n")
                rules += 1
    print(f"{rules} rules from {len(files)} files -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
