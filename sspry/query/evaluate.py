"""Plan evaluation over one segment, Tier 1 before Tier 2.

The gram leaves of all plans of a batch are hashed once; `gather.read_leaves` reads their rows out of
every bloom class of a segment, in one compiled call per tier or with numpy for a small search (k rows
per gram, one bit per document).
The plans are compiled once into straight-line `Program`s whose And/Or/AtLeast instructions take their
gram leaves as row-index arrays, so a node costs one numpy reduction per segment.

First every plan runs with its Tier 2 leaves replaced by TRUE (gram leaves only ever appear
un-negated, see plan.Approx, so that is an upper bound); Tier 2 rows are then read only for the plans
that kept a document, and only in the classes holding their survivors.
"""

from __future__ import annotations

import numpy as np

from sspry.features.sizing import gram_hashes
from sspry.policy import Policy
from sspry.query.facts import evaluate_fact
from sspry.query.gather import read_leaves
from sspry.query.plan import (
    TRUE,
    And,
    AtLeast,
    Const,
    Gram,
    Node,
    Not,
    Or,
    and_,
    at_least,
    leaves,
    not_,
    or_,
)
from sspry.store.forest import SegmentView
from sspry.store.segment import SegmentReader


def drop_tier(node: Node, tier: int, memo: dict[int, Node] | None = None) -> Node:
    """`node` with every Gram leaf of `tier` replaced by TRUE (simplified as it is rebuilt)."""
    memo = {} if memo is None else memo
    done = memo.get(id(node))
    if done is not None:
        return done
    if isinstance(node, Gram):
        result = TRUE if node.tier == tier else node
    elif isinstance(node, And):
        result = and_(*(drop_tier(c, tier, memo) for c in node.children))
    elif isinstance(node, Or):
        result = or_(*(drop_tier(c, tier, memo) for c in node.children))
    elif isinstance(node, AtLeast):
        result = at_least(node.k, [drop_tier(c, tier, memo) for c in node.children])
    elif isinstance(node, Not):
        result = not_(drop_tier(node.child, tier, memo))
    else:
        result = node
    memo[id(node)] = result
    return result


class GramTable:
    """The distinct grams of a batch of plans, per tier, with their hashes computed once."""

    def __init__(self, plan_grams: list[set]):
        found: set[Node] = set().union(*plan_grams)
        self.grams: dict[int, list[Gram]] = {1: [], 2: []}
        for leaf in sorted(found, key=lambda g: (g.tier, g.gram)):
            self.grams[leaf.tier].append(leaf)
        self.row = {leaf: i for tier in (1, 2) for i, leaf in enumerate(self.grams[tier])}
        self.h2 = {tier: gram_hashes([g.gram for g in gs])[1] for tier, gs in self.grams.items()}


class Program:
    """Plans compiled to instructions over numbered slots; `outputs[i]` is plan i's slot."""

    def __init__(self, plans: list[Node], table: GramTable):
        self.table = table
        self.instructions: list[tuple] = []
        self._slots: dict[int, int] = {}
        self.outputs = [self._compile(plan) for plan in plans]

    def _compile(self, node: Node) -> int:
        slot = self._slots.get(id(node))
        if slot is not None:
            return slot
        if isinstance(node, And | Or | AtLeast | Gram):
            children = (node,) if isinstance(node, Gram) else node.children
            rows: dict[int, list[int]] = {1: [], 2: []}
            others = []
            for child in children:
                if isinstance(child, Gram):
                    rows[child.tier].append(self.table.row[child])
                else:
                    others.append(self._compile(child))
            op = "or" if isinstance(node, Or) else "atleast" if isinstance(node, AtLeast) else "and"
            k = node.k if isinstance(node, AtLeast) else 0
            instruction = (op, k, np.array(rows[1], dtype=np.intp), np.array(rows[2], dtype=np.intp), others)
        elif isinstance(node, Not):
            instruction = ("not", self._compile(node.child))
        elif isinstance(node, Const):
            instruction = ("const", node.value)
        else:
            instruction = ("fact", node)
        self.instructions.append(instruction)
        slot = len(self.instructions) - 1
        self._slots[id(node)] = slot
        return slot

    def run(self, reader: SegmentReader, bits: dict[int, np.ndarray]) -> list[np.ndarray]:
        docs = reader.docs
        values: list[np.ndarray] = []
        for instruction in self.instructions:
            op = instruction[0]
            if op in ("and", "or"):
                _, _, rows1, rows2, others = instruction
                parts = [values[s] for s in others]
                for tier, rows in ((1, rows1), (2, rows2)):
                    if len(rows):
                        matrix = bits[tier][rows]
                        parts.append(matrix.all(axis=0) if op == "and" else matrix.any(axis=0))
                reduce = np.logical_and if op == "and" else np.logical_or
                value = reduce.reduce(parts) if len(parts) > 1 else parts[0]
            elif op == "atleast":
                _, k, rows1, rows2, others = instruction
                counts = np.zeros(docs, dtype=np.int32)
                for tier, rows in ((1, rows1), (2, rows2)):
                    if len(rows):
                        counts += bits[tier][rows].sum(axis=0, dtype=np.int32)
                for s in others:
                    counts += values[s]
                value = counts >= k
            elif op == "not":
                value = ~values[instruction[1]]
            elif op == "const":
                value = np.full(docs, instruction[1], dtype=bool)
            else:
                value = evaluate_fact(instruction[1], reader)
            values.append(value)
        return [values[s] for s in self.outputs]


class Batch:
    """A batch of plans ready to run on any segment: grams hashed, both programs compiled, and for each
    plan the Tier 2 grams it uses (read only where the plan survived Tier 1)."""

    def __init__(self, plans: list[Node], plan_grams: list[set] | None = None):
        plan_grams = [leaves(p, Gram) for p in plans] if plan_grams is None else plan_grams
        self.table = GramTable(plan_grams)
        memo: dict[int, Node] = {}
        self.tier1 = Program([drop_tier(p, 2, memo) for p in plans], self.table)
        self.full = Program(plans, self.table)
        self.tier2_rows = [
            np.array(sorted(self.table.row[g] for g in grams if g.tier == 2), dtype=np.intp)
            for grams in plan_grams
        ]


class SegmentEvaluator:
    def __init__(self, view: SegmentView, batch: Batch, policy: Policy, compiled_gather: bool = True):
        self.view = view
        self.reader = view.reader
        self.batch = batch
        self.policy = policy
        self.compiled_gather = compiled_gather  # see gather.py

    def evaluate(self) -> list[np.ndarray]:
        """Per plan of the batch, the live documents it selects."""
        live = self.view.live
        table = self.batch.table
        bits = {1: self._read(1, table.h2[1], None)}
        first = [selected & live for selected in self.batch.tier1.run(self.reader, bits)]
        alive = [i for i, selected in enumerate(first) if selected.any()]
        if not alive or not table.grams[2]:
            return first
        rows = np.unique(np.concatenate([self.batch.tier2_rows[i] for i in alive]))
        survivors = np.logical_or.reduce([first[i] for i in alive])
        tier2 = np.zeros((len(table.grams[2]), self.reader.docs), dtype=bool)
        tier2[rows] = self._read(2, table.h2[2][rows], survivors)
        bits[2] = tier2
        full = self.batch.full.run(self.reader, bits)
        return [full[i] & first[i] if i in set(alive) else first[i] for i in range(len(first))]

    def _read(self, tier: int, h2: np.ndarray, documents: np.ndarray | None) -> np.ndarray:
        k = self.policy.tier_k(tier)
        return read_leaves(self.reader, tier, h2, k, documents, compiled=self.compiled_gather)
