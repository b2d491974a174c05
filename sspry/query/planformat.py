"""The stored form of a RulePlan (plan cache entries): versioned JSON, never pickle.

A plan is a DAG of interned nodes. It is stored as a node table -- its grams first, one hex string per
tier, then every other node in post order as a list `[code, field, ...]` whose node fields are indices
of earlier entries -- plus the rule's notes and string plans. Decoding rebuilds every node with its own
constructor, so a decoded plan is made of the very objects planning would have made (nodes are interned).
Line numbers are stored relative to the rule's first line (None: no location), so a rule that moved
within its file keeps exact positions.
"""

from __future__ import annotations

import json
from operator import itemgetter

from sspry.query.plan import (
    TIER_BYTE,
    And,
    AtLeast,
    BytesAt,
    Const,
    Entropy,
    Field,
    Filesize,
    Gram,
    Identity,
    Node,
    Not,
    Or,
    ReadInt,
    Unscanned,
    tiered_gram,
)
from sspry.query.ruleplan import Note, RulePlan
from sspry.query.strings import StringPlan

FORMAT_VERSION = 1

# node type -> (code, kinds of its key fields): n node, i int, f float, s str, b bool, y bytes (hex),
# t tuple of ints, * the rest are nodes
_SCHEMA: dict[type, tuple[str, str]] = {
    Const: ("c", "b"),
    Gram: ("g", "iy"),
    Filesize: ("s", "si"),
    Field: ("f", "ssi"),
    Unscanned: ("u", ""),
    Entropy: ("e", "sf"),
    Identity: ("d", "y"),
    ReadInt: ("r", "siibbisi"),
    BytesAt: ("x", "sit"),
    And: ("a", "*"),
    Or: ("o", "*"),
    AtLeast: ("k", "i*"),
    Not: ("n", "n"),
}
_BY_CODE = {code: (kind, fields) for kind, (code, fields) in _SCHEMA.items()}
_NODES_ONLY = frozenset(kind for kind, (_, fields) in _SCHEMA.items() if fields == "*")  # And, Or


class FormatError(ValueError):
    """A stored plan this version cannot read (another format version, or damaged)."""


class _Encoder:
    """Numbers the distinct nodes under some roots: grams first (grouped by tier, stored as one hex
    string per tier: most nodes are grams), then every other node in post order."""

    def __init__(self, roots: list[Node]) -> None:
        grams: dict[Node, None] = {}
        others: dict[Node, None] = {}
        for root in roots:
            stack: list = [root]  # a node to visit, or (node,) once its children are done
            while stack:
                item = stack.pop()
                if type(item) is tuple:
                    others[item[0]] = None
                    continue
                if item in others or item in grams:
                    continue
                kind = type(item)
                if kind is Gram:
                    grams[item] = None
                    continue
                children = (
                    item.key[1:] if kind in _NODES_ONLY else [f for f in item.key[1:] if isinstance(f, Node)]
                )
                if children:
                    stack.append((item,))
                    stack.extend(reversed(children))
                else:  # a leaf fact: done at once, as post order has it
                    others[item] = None
        ordered = sorted(grams, key=itemgetter(0))  # by tier (a gram's first byte), stable
        self.index: dict[Node, int] = {node: i for i, node in enumerate(ordered)}
        self.grams: list[list] = []
        for gram in ordered:
            tier, size = gram[0], len(gram) - 1
            if not self.grams or self.grams[-1][0] != tier or self.grams[-1][1] != size:
                self.grams.append([tier, size, []])
            self.grams[-1][2].append(gram[1:])
        for group in self.grams:
            group[2] = b"".join(group[2]).hex()
        self.rows: list[list] = []
        index = self.index
        for node in others:
            code, kinds = _SCHEMA[type(node)]
            if kinds == "*":  # And, Or: every field a node (most rows)
                row: list = [code, *map(index.__getitem__, node.key[1:])]
            else:
                row = [code]
                for position, value in enumerate(node.key[1:]):
                    kind = kinds[position] if position < len(kinds) and kinds[position] != "*" else "n"
                    row.append(_encode_field(kind, value, index))
            index[node] = len(index)
            self.rows.append(row)


def _encode_field(kind: str, value, index: dict[Node, int]):
    if kind == "n":
        return index[value]
    if kind == "y":
        return value.hex()
    if kind == "t":
        return list(value)
    return value


def _decode_field(kind: str, value, nodes: list[Node]):
    if kind == "n":
        return nodes[value]
    if kind == "y":
        return bytes.fromhex(value)
    if kind == "t":
        return tuple(value)
    if kind == "f":
        return float(value)
    return value


def _decode_nodes(grams: list[list], rows: list[list]) -> list[Node]:
    nodes: list[Node] = []
    for tier, size, text in grams:
        data = bytes.fromhex(text)
        prefix = TIER_BYTE[tier]
        nodes.extend(tiered_gram(prefix + data[at : at + size]) for at in range(0, len(data), size))
    for row in rows:
        code = row[0]
        if code == "a":
            nodes.append(And(*[nodes[i] for i in row[1:]]))
        elif code == "o":
            nodes.append(Or(*[nodes[i] for i in row[1:]]))
        else:
            kind, fields = _BY_CODE[code]
            values = [
                _decode_field(fields[i] if i < len(fields) and fields[i] != "*" else "n", value, nodes)
                for i, value in enumerate(row[1:])
            ]
            nodes.append(kind(*values))
    return nodes


def _seq(seq: tuple[int, ...]) -> str | list:
    """A Seq of an exact string: the hex of its bytes when every position is one byte (most are), else
    per position its byte or its mask in hex."""
    if all(m and m & (m - 1) == 0 for m in seq):
        return bytes(m.bit_length() - 1 for m in seq).hex()
    return [_mask(m) for m in seq]


def _unseq(value: str | list) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(1 << b for b in bytes.fromhex(value))
    return tuple(map(_unmask, value))


def _mask(mask: int) -> int | str:
    """A byte set of an exact string: its byte when it is one (most are), else the mask in hex."""
    return mask.bit_length() - 1 if mask & (mask - 1) == 0 and mask else format(mask, "x")


def _unmask(value: int | str) -> int:
    return 1 << value if isinstance(value, int) else int(value, 16)


def _relative(line: int, base: int) -> int | None:
    return None if line <= 0 else line - base


def _absolute(line: int | None, base: int) -> int:
    return 0 if line is None else line + base


def encode(plan: RulePlan, base_line: int) -> bytes:
    """The stored form of `plan`, lines relative to `base_line` (the rule's first line)."""
    encoder = _Encoder([plan.upper, *(s.node for s in plan.strings)])
    strings = [
        [
            s.identifier,
            encoder.index[s.node],
            s.note,
            None if s.exact is None else [_seq(seq) for seq in sorted(s.exact)],
            s.fullword,
            _relative(s.line, base_line),
            s.column,
        ]
        for s in plan.strings
    ]
    notes = [[n.code, n.text, _relative(n.line, base_line), n.column] for n in plan.notes]
    document = {
        "v": FORMAT_VERSION,
        "grams": encoder.grams,
        "nodes": encoder.rows,
        "upper": encoder.index[plan.upper],
        "notes": notes,
        "strings": strings,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode(data: bytes, name: str, base_line: int) -> RulePlan:
    """The RulePlan stored in `data`, for rule `name` whose first line is now `base_line`."""
    try:
        document = json.loads(data)
        if document.get("v") != FORMAT_VERSION:
            raise FormatError(f"plan format {document.get('v')}, this version reads {FORMAT_VERSION}")
        nodes = _decode_nodes(document["grams"], document["nodes"])
        strings = [
            StringPlan(
                identifier,
                nodes[node],
                note,
                None if exact is None else frozenset(_unseq(seq) for seq in exact),
                fullword,
                _absolute(line, base_line),
                column,
            )
            for identifier, node, note, exact, fullword, line, column in document["strings"]
        ]
        notes = [
            Note(name, code, text, _absolute(line, base_line), column)
            for code, text, line, column in document["notes"]
        ]
        return RulePlan(name, nodes[document["upper"]], notes, strings)
    except FormatError:
        raise
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"damaged stored plan: {type(exc).__name__}: {exc}") from exc
