"""Plan evaluation over one segment, class by class, Tier 1 before Tier 2.

For every bloom class of the segment, the gram leaves of all plans are hashed once, turned into bit
positions for that class's size, and the rows at those positions are read from the bit-sliced matrix
(k rows per gram, one bit per document). Leaves become per-document boolean vectors; the plan formulas
combine them with numpy. Tier 2 rows are read only for classes where some document survived the plans
evaluated with Tier 1 facts alone (a plan only uses gram leaves positively, so Tier 1 alone is an upper
bound of the whole).
"""

from __future__ import annotations

import numpy as np

from sspry.features.sizing import bloom_positions, gram_hashes
from sspry.policy import Policy
from sspry.query.plan import AtLeast, Const, Filesize, Gram, Node, Not, Or, leaves
from sspry.store.forest import SegmentView

_COMPARE = {
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


class GramTable:
    """The distinct grams of a batch of plans, per tier, with their hashes computed once."""

    def __init__(self, plans: list[Node]):
        self.grams: dict[int, list[Gram]] = {1: [], 2: []}
        found: set[Node] = set()
        for plan in plans:
            found |= leaves(plan, Gram)
        for leaf in sorted(found, key=lambda g: (g.tier, g.gram)):
            self.grams[leaf.tier].append(leaf)
        self.index = {tier: {g: i for i, g in enumerate(gs)} for tier, gs in self.grams.items()}
        self.h2 = {tier: gram_hashes([g.gram for g in gs])[1] for tier, gs in self.grams.items()}


class SegmentEvaluator:
    def __init__(self, view: SegmentView, table: GramTable, policy: Policy):
        self.view = view
        self.reader = view.reader
        self.table = table
        self.policy = policy
        self.docs = view.reader.docs
        self.leaf_bits: dict[int, np.ndarray | None] = {1: None, 2: None}
        self.memo: dict[int, np.ndarray] = {}

    def _read_tier(self, tier: int, wanted: np.ndarray | None) -> np.ndarray:
        """Leaf vectors of every gram of the tier: bool (grams x docs). Classes where no document is
        `wanted` are left False (their documents are out of the running already)."""
        grams = self.table.grams[tier]
        bits = np.zeros((len(grams), self.docs), dtype=bool)
        if not grams:
            return bits
        k = self.policy.tier_k(tier)
        h2 = self.table.h2[tier]
        for index, span in enumerate(self.reader.classes[tier]):
            members = self.reader.class_members(tier, index)
            if wanted is not None and not wanted[members].any():
                continue
            positions = bloom_positions(h2, span.blocks, k).reshape(-1)
            rows = self.reader.rows(tier, index, positions)
            present = rows.reshape(len(grams), k, span.count).all(axis=1)
            bits[:, members] = present
        return bits

    def evaluate(self, plans: list[Node]) -> list[np.ndarray]:
        """Per plan, the documents (live ones only) it selects."""
        live = self.view.live
        self.leaf_bits[1] = self._read_tier(1, None)
        self.leaf_bits[2] = None  # Tier 2 leaves count as TRUE in the first pass
        self.memo = {}
        first = [self._eval(plan) & live for plan in plans]
        survivors = np.logical_or.reduce(first) if first else np.zeros(self.docs, dtype=bool)
        if not survivors.any() or not self.table.grams[2]:
            return first
        self.leaf_bits[2] = self._read_tier(2, survivors)
        self.memo = {}
        return [self._eval(plan) & f if f.any() else f for plan, f in zip(plans, first, strict=True)]

    def _eval(self, node: Node) -> np.ndarray:
        cached = self.memo.get(id(node))
        if cached is not None:
            return cached
        if isinstance(node, Gram):
            bits = self.leaf_bits[node.tier]
            if bits is None:
                result = np.ones(self.docs, dtype=bool)
            else:
                result = bits[self.table.index[node.tier][node]]
        elif isinstance(node, Const):
            result = np.full(self.docs, node.value, dtype=bool)
        elif isinstance(node, Filesize):
            result = (
                _COMPARE[node.op](self.reader.filesize, np.uint64(node.value))
                if node.value >= 0
                else (np.full(self.docs, node.op in (">", ">=", "!="), dtype=bool))
            )
        elif isinstance(node, Not):
            result = ~self._eval(node.child)
        elif isinstance(node, AtLeast):
            counts = np.zeros(self.docs, dtype=np.int32)
            for child in node.children:
                counts += self._eval(child)
            result = counts >= node.k
        else:  # And / Or
            children = [self._eval(child) for child in node.children]
            result = (np.logical_or if isinstance(node, Or) else np.logical_and).reduce(children)
        self.memo[id(node)] = result
        return result
