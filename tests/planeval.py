"""Evaluate a plan on one file's exact facts: its true gram sets and its metadata (as extraction computes
it), with no bloom and no store.

If yara-python matches a file, the plan's upper bound must hold here: that is planner soundness, tested
without the false positives a bloom adds. Metadata leaves go through the production `evaluate_fact`.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from sspry.features.extract import shannon_entropy
from sspry.features.metadata import module_fields
from sspry.policy import Policy
from sspry.query.facts import evaluate_fact
from sspry.query.literals import DEFAULT_MAX_ANCHORS
from sspry.query.plan import And, AtLeast, Const, Gram, Node, Not, Or
from sspry.query.rules import yaramod_parser
from sspry.query.ruleset import plan_rules
from tests.reference import indexed_grams


class OneDocument:
    """The columns of a segment holding just this file (what evaluate_fact reads)."""

    def __init__(self, data: bytes, policy: Policy):
        self.docs = 1
        self.source_id = hashlib.new(policy.id_source, data).digest()
        self.filesize = np.array([len(data)], dtype=np.uint64)
        counts = Counter(data)
        self.entropy = np.array([shannon_entropy(np.array([counts.get(b, 0) for b in range(256)]))])
        self.prefix = _padded(data[: policy.prefix_bytes], policy.prefix_bytes)
        self.prefix_len = np.array([min(len(data), policy.prefix_bytes)])
        fields, entry, scanned = module_fields(data=data)
        self.fields = fields
        self.entry = _padded(entry, 16)
        self.entry_len = np.array([len(entry)])
        self.scanned = np.array([scanned])

    def find(self, source_ids):
        return np.array([0 if s == self.source_id else -1 for s in source_ids])

    def field(self, name: str):
        present = name in self.fields
        return np.array([present]), np.array([self.fields.get(name, 0)], dtype=np.int64)


def _padded(data: bytes, width: int) -> np.ndarray:
    out = np.zeros((1, width), dtype=np.uint8)
    out[0, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


class Facts:
    def __init__(self, data: bytes, policy: Policy):
        self.grams = {
            tier: set(indexed_grams(data, n, policy.fold_case and tier == 1))
            for tier, n in zip((1, 2), policy.gram_sizes, strict=True)
        }
        self.document = OneDocument(data, policy)

    def holds(self, node: Node) -> bool:
        if isinstance(node, Gram):
            return node.gram in self.grams[node.tier]
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Not):
            return not self.holds(node.child)
        if isinstance(node, AtLeast):
            return sum(self.holds(c) for c in node.children) >= node.k
        if isinstance(node, And | Or):
            results = (self.holds(c) for c in node.children)
            return any(results) if isinstance(node, Or) else all(results)
        return bool(evaluate_fact(node, self.document)[0])


def plans_for(
    source: str, targets, policy: Policy, max_anchors: int = DEFAULT_MAX_ANCHORS
) -> dict[str, Node]:
    text = yaramod_parser().parse_string(source).text
    return {p.name: p.upper for p in plan_rules(text, targets, policy, max_anchors)}
