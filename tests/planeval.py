"""Evaluate a plan on one file's exact facts (its true gram sets, its size), with no bloom and no store.

If yara-python matches a file, the plan's upper bound must hold here: that is planner soundness, tested
without the false positives a bloom adds."""

from __future__ import annotations

from sspry.policy import Policy
from sspry.query.condition import plan_rules
from sspry.query.plan import AtLeast, Const, Filesize, Gram, Node, Not, Or
from tests.reference import grams


class Facts:
    def __init__(self, data: bytes, policy: Policy):
        self.filesize = len(data)
        self.grams = {tier: set(grams(data, n)) for tier, n in zip((1, 2), policy.gram_sizes, strict=True)}

    def holds(self, node: Node) -> bool:
        if isinstance(node, Gram):
            return node.gram in self.grams[node.tier]
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Filesize):
            return {
                "==": self.filesize == node.value,
                "!=": self.filesize != node.value,
                "<": self.filesize < node.value,
                "<=": self.filesize <= node.value,
                ">": self.filesize > node.value,
                ">=": self.filesize >= node.value,
            }[node.op]
        if isinstance(node, Not):
            return not self.holds(node.child)
        if isinstance(node, AtLeast):
            return sum(self.holds(c) for c in node.children) >= node.k
        results = (self.holds(c) for c in node.children)
        return any(results) if isinstance(node, Or) else all(results)


def plans_for(source: str, targets, policy: Policy, max_anchors: int = 16) -> dict[str, Node]:
    import yaramod

    text = yaramod.Yaramod().parse_string(source).text
    return {p.name: p.upper for p in plan_rules(text, targets, policy, max_anchors)}
