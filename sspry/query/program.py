"""Plans compiled to straight-line code over packed document bitmaps (query/bitmaps.py), and its numpy runner.

A batch of plans becomes one instruction list; instruction i computes one node of the (shared) plan
DAG into a value slot, from operands that are gram rows of either tier, fact rows, or the slots of
earlier instructions:

    AND / OR        the operands ANDed / ORed, word by word
    AT_LEAST k      at least k operands set (operands may repeat: each occurrence counts), counted per
                    document with bit-sliced counters: a ripple-carry adder over words, so 64 documents
                    are counted at once, then a word-wise comparison of the count with k
    NOT             the complement (only ever over exact facts, see plan.Approx)
    CONST           all zeros or all ones

Slots are reused once their last reader has run (a linear scan over the instruction order), so the
bench's 1,000-rule bundle (5,610 instructions) needs 264 rows of scratch, not one per node. An
instruction that is a plan's result is also *emitted*: written, masked, to that plan's output row as
soon as it is computed.

`code`, `refs`, `emits` and `deps` are plain int64 arrays, run by `kernels.run_program` (compiled) or
`run_numpy` below (the same semantics; the choice is query/gather.py's `compiled_pays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from sspry.features.sizing import gram_hashes
from sspry.query.plan import And, AtLeast, Const, Gram, Node, Not, Or

# opcodes (kernels.run_program uses the same numbers: a test holds them equal)
AND, OR, AT_LEAST, NOT, CONST = range(5)
# operand kinds: a row of the tier 1 leaves, the tier 2 leaves, the facts, or a value slot
TIER1, TIER2, FACT, VALUE = range(4)
# columns of `code`
OP, PARAM, SLOT, FIRST, END, EMIT_FIRST, EMIT_END = range(7)

ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class Leaves:
    """The distinct leaves of a batch of plans: gram rows per tier (hashes computed once) and fact rows
    (every leaf that is neither a gram nor a constant: file size, module fields, stored bytes, ...)."""

    def __init__(self, plans: Sequence[Node]):
        grams: set[Gram] = set()
        facts: dict[Node, None] = {}  # insertion-ordered set
        stack, seen = list(plans), set()
        while stack:
            node = stack.pop()
            if type(node) is Gram:  # most nodes: a value, kept once by the set
                grams.add(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, And | Or | AtLeast):
                stack.extend(node.children)
            elif isinstance(node, Not):
                stack.append(node.child)
            elif not isinstance(node, Const):
                facts[node] = None
        self.grams: dict[int, list[Gram]] = {}
        self.h2: dict[int, np.ndarray] = {}
        for tier in (1, 2):
            found = sorted(g for g in grams if g[0] == tier)  # by gram: every one starts with its tier byte
            h2 = gram_hashes([g.gram for g in found])[1]
            # rows in the order of their blocks: block = (h2 >> 32) * nblocks >> 32 grows with h2 in every
            # class, so the gather walks each class matrix from its first row to its last
            order = np.argsort(h2, kind="stable")
            self.grams[tier] = [found[i] for i in order.tolist()]
            self.h2[tier] = h2[order]
        self.facts: list[Node] = list(facts)
        # every leaf -> its operand in a program (one lookup while compiling, and one tuple per leaf)
        self.operand: dict[Node, tuple[int, int]] = {
            leaf: (TIER1 if tier == 1 else TIER2, i)
            for tier in (1, 2)
            for i, leaf in enumerate(self.grams[tier])
        }
        self.operand.update((fact, (FACT, i)) for i, fact in enumerate(self.facts))


Op = tuple[int, int, list[tuple[int, int]]]  # (opcode, parameter, operands as (kind, index))
_TRUE, _FALSE = -1, -2  # an instruction found constant while deriving a program


class Program:
    """Instructions (`ops`, VALUE operands naming earlier instructions) assembled into arrays; plan p's
    result is instruction results[p]. `outputs` is the number of plans (output rows)."""

    def __init__(self, ops: list[Op], results: list[int]):
        self.ops = ops
        self.results = results
        self.outputs = len(results)
        self._assemble(results)

    @classmethod
    def compile(cls, plans: Sequence[Node], leaves: Leaves) -> Program:
        """`plans` over the rows of `leaves`; a node shared by several plans is computed once."""
        ops: list[Op] = []
        memo: dict[int, int] = {}

        leaf_operand = leaves.operand

        def operand(node: Node) -> tuple[int, int]:
            found = leaf_operand.get(node)
            return (VALUE, instruction(node)) if found is None else found

        def instruction(node: Node) -> int:
            found = memo.get(id(node))
            if found is not None:
                return found
            if isinstance(node, And | Or | AtLeast):
                op = AND if isinstance(node, And) else OR if isinstance(node, Or) else AT_LEAST
                ops.append((op, node.k if op == AT_LEAST else 0, [operand(c) for c in node.children]))
            elif isinstance(node, Not):
                ops.append((NOT, 0, [operand(node.child)]))
            elif isinstance(node, Const):
                ops.append((CONST, int(node.value), []))
            else:  # a gram or a fact as a whole plan
                ops.append((AND, 0, [operand(node)]))
            memo[id(node)] = len(ops) - 1
            return len(ops) - 1

        return cls(ops, [instruction(plan) for plan in plans])

    def without_tier2(self) -> Program:
        """This program with every Tier 2 operand taken as TRUE and the constants that makes folded: for
        each plan an upper bound of it (gram leaves only ever appear un-negated, see plan.Approx)."""
        ops: list[Op] = []
        mapped: list[int] = []  # per instruction: its index in `ops`, or _TRUE / _FALSE
        for op, param, operands in self.ops:
            kept: list[tuple[int, int]] = []
            trues = falses = 0
            for kind, index in operands:
                value = _TRUE if kind == TIER2 else mapped[index] if kind == VALUE else 0
                if value == _TRUE:
                    trues += 1
                elif value == _FALSE:
                    falses += 1
                else:
                    kept.append((kind, value if kind == VALUE else index))
            if op == CONST:
                result = _TRUE if param else _FALSE
            elif op == AND:
                result = _FALSE if falses else None if kept else _TRUE
            elif op == OR:
                result = _TRUE if trues else None if kept else _FALSE
            elif op == AT_LEAST:
                param -= trues
                result = _TRUE if param <= 0 else _FALSE if param > len(kept) else None
            else:  # NOT
                result = None if kept else _FALSE if trues else _TRUE
            if result is None:
                ops.append((op, param, kept))
                mapped.append(len(ops) - 1)
            else:
                mapped.append(result)
        constants: dict[int, int] = {}
        results = []
        for index in self.results:
            value = mapped[index]
            if value < 0:
                if value not in constants:
                    ops.append((CONST, int(value == _TRUE), []))
                    constants[value] = len(ops) - 1
                value = constants[value]
            results.append(value)
        return Program(ops, results)

    def _assemble(self, results: list[int]) -> None:
        """Instructions to arrays, with value slots allocated by a linear scan over last uses. Only the
        scan is a loop over instructions; everything per operand is one numpy step (a bundle of
        Yara-Rules' 12,774 rules is 48,009 instructions reading 830,000 operands)."""
        ops = self.ops
        n = len(ops)
        counts = np.array([len(operands) for _, _, operands in ops], dtype=np.int64)
        flat = chain.from_iterable(chain.from_iterable(operands for _, _, operands in ops))
        refs = np.fromiter(flat, dtype=np.int64, count=2 * int(counts.sum())).reshape(-1, 2)
        reader = np.repeat(np.arange(n, dtype=np.int64), counts)  # the instruction of each operand
        value = refs[:, 0] == VALUE
        children, readers = refs[value, 1], reader[value]
        last_use = np.arange(n, dtype=np.int64)  # an instruction nobody reads frees its slot right away
        np.maximum.at(last_use, children, readers)
        # per instruction, the children it reads for the last time, in operand order, each once
        dying = np.flatnonzero(last_use[children] == readers)
        _, first = np.unique(readers[dying] * n + children[dying], return_index=True)
        dying = dying[np.sort(first)]
        ends = np.searchsorted(readers[dying], np.arange(1, n + 1)).tolist()
        dying_children = children[dying].tolist()
        free: list[int] = []
        slots = 0
        slot_of = [0] * n
        start = 0
        for i, (own_end, last) in enumerate(zip(ends, last_use.tolist(), strict=True)):
            if free:
                slot = free.pop()
            else:
                slot = slots
                slots += 1
            slot_of[i] = slot
            # children read for the last time free their slots (after ours is taken: never aliased)
            free += [slot_of[child] for child in dying_children[start:own_end]]
            start = own_end
            if last == i:
                free.append(slot)
        slot_array = np.array(slot_of, dtype=np.int64)
        refs[value, 1] = slot_array[children]
        emitted = np.bincount(np.asarray(results, dtype=np.int64), minlength=n)
        code = np.zeros((n, 7), dtype=np.int64)
        code[:, 0] = [op for op, _, _ in ops]
        code[:, 1] = [param for _, param, _ in ops]
        code[:, 2] = slot_array
        code[:, 4] = np.cumsum(counts)
        code[:, 3] = code[:, 4] - counts
        code[:, 6] = np.cumsum(emitted)
        code[:, 5] = code[:, 6] - emitted
        self.code = code
        self.refs = refs
        self.emits = np.argsort(np.asarray(results, dtype=np.int64), kind="stable")
        self.slots = max(slots, 1)
        at_least = [len(operands) for op, _, operands in ops if op == AT_LEAST]
        self.counter_rows = max((count.bit_length() for count in at_least), default=1)
        self._dependencies(results)

    def _dependencies(self, results: list[int]) -> None:
        """Per plan (CSR), the instructions its result needs (`deps`: a run for some plans skips the
        others') and the Tier 2 rows they read (`tier2_rows`: read only for plans that need them)."""
        starts, flat, tier2_starts, tier2 = [0], [], [0], []
        for result in results:
            stack, seen, rows = [result], {result}, set()
            while stack:
                index = stack.pop()
                flat.append(index)
                for kind, child in self.ops[index][2]:
                    if kind == VALUE and child not in seen:
                        seen.add(child)
                        stack.append(child)
                    elif kind == TIER2:
                        rows.add(child)
            starts.append(len(flat))
            tier2.extend(sorted(rows))
            tier2_starts.append(len(tier2))
        self.deps_start = np.array(starts, dtype=np.int64)
        self.deps = np.array(flat, dtype=np.int64)
        self.tier2_starts = np.array(tier2_starts, dtype=np.int64)
        self.tier2_rows = np.array(tier2, dtype=np.int64)

    def needed(self, alive: np.ndarray) -> np.ndarray:
        """Per instruction: does a plan marked in `alive` need it?"""
        needed = np.zeros(len(self.code), dtype=bool)
        for plan in np.flatnonzero(alive).tolist():
            needed[self.deps[self.deps_start[plan] : self.deps_start[plan + 1]]] = True
        return needed


def run_numpy(
    program: Program,
    leaves1: np.ndarray,
    leaves2: np.ndarray,
    facts: np.ndarray,
    masks: np.ndarray,
    per_plan: bool,
    out: np.ndarray,
    alive: np.ndarray,
    nonempty: np.ndarray,
) -> None:
    """Run `program` for the plans marked in `alive`: out[p] = result & (masks[p] if per_plan else
    masks[0]) and nonempty[p] = whether that has a bit set; other plans' rows are left alone. `out` may be
    `masks`. The compiled kernels.run_program does the same."""
    words = out.shape[1]
    sources = (leaves1, leaves2, facts)
    values: list[np.ndarray | None] = [None] * program.slots
    needed = program.needed(alive) if not alive.all() else np.ones(len(program.code), dtype=bool)
    for i in np.flatnonzero(needed).tolist():
        op, param, slot, first, end, emit_first, emit_end = program.code[i].tolist()
        rows = [
            values[index] if kind == VALUE else sources[kind][index]
            for kind, index in program.refs[first:end]
        ]
        if op in (AND, OR):
            value = rows[0].copy()
            combine = np.bitwise_and if op == AND else np.bitwise_or
            for row in rows[1:]:
                combine(value, row, out=value)
        elif op == NOT:
            value = ~rows[0]
        elif op == CONST:
            value = np.full(words, ALL_ONES if param else 0, dtype=np.uint64)
        else:
            value = _at_least(param, rows, words)
        values[slot] = value
        for plan in program.emits[emit_first:emit_end].tolist():
            if alive[plan]:
                np.bitwise_and(value, masks[plan] if per_plan else masks[0], out=out[plan])
                nonempty[plan] = bool(out[plan].any())


def _at_least(k: int, rows: list[np.ndarray], words: int) -> np.ndarray:
    """Documents set in at least k of `rows`: bit-sliced counters (counter bit j of 64 documents in one
    word) incremented by a ripple-carry adder, then compared with k from the top bit down."""
    width = len(rows).bit_length()
    counters = np.zeros((width, words), dtype=np.uint64)
    for row in rows:
        carry = row
        for j in range(width):
            carry, counters[j] = counters[j] & carry, counters[j] ^ carry
    greater = np.zeros(words, dtype=np.uint64)
    equal = np.full(words, ALL_ONES, dtype=np.uint64)
    for j in range(width - 1, -1, -1):
        if (k >> j) & 1:
            equal &= counters[j]
        else:
            greater |= equal & counters[j]
    return greater | equal
