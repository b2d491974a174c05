"""Plan nodes: the boolean formula a rule becomes, over facts a segment can evaluate per document.

Leaves are bloom facts (`Gram`: this n-gram is in the Tier 1 or Tier 2 bloom) and exact facts from the
metadata sidecar (`Filesize`, ...). Nodes other than grams are interned: structurally equal nodes are the
same object, so the plans of a bundle share subtrees and memoised evaluation is by identity. Grams are
values (bytes): equal grams are equal keys, so a gram row is still read once. The constructors simplify
(constant folding, flattening, de-duplication) as they build.

A rule condition is planned as an `Approx(upper, lower, undefined)`: `upper` holds for every document the
condition may match (the candidates), `lower` only for documents it surely matches. Negation swaps them,
so `not $a` gives upper = not(lower($a)) = TRUE: a bloom can prove a string absent but never present.
Anything the planner does not understand is (TRUE, FALSE).

YARA's values can also be UNDEFINED (`@a[1]` without a match, a read past the end, a module field a file
does not have), and undefined is neither true nor false: `not` keeps it undefined, while `and`, `or`,
`of` and loops count it as false and are always defined. So `undefined` bounds where a condition may be
undefined, and `not x` is surely true only where x is surely false *and defined*. Without it,
`not ((not $a) and not (@a[1] == 0))` would require $a, yet YARA matches files without it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial


class _Ref(weakref.ref):
    """A weak reference that knows its node's key, to forget the node when it dies."""

    __slots__ = ("key",)


def _forget(ref: _Ref) -> None:
    if _INTERN.get(ref.key) is ref:
        _INTERN.pop(ref.key, None)


# key -> weak reference to the one node with that key. Not a WeakValueDictionary: its Python-level get
# and KeyedRef construction were a quarter of planning a large bundle.
_INTERN: dict[tuple, _Ref] = {}

OPS = ("==", "!=", "<", "<=", ">", ">=")


class Node:
    """A plan node: an interned node (`Interned`) or a gram leaf (`Gram`, compared by value)."""

    __slots__ = ()
    key: tuple  # (type, *fields): what the node is, for storing and dumping plans


class Interned(Node):
    """A node that exists once per key while anything holds it (see _INTERN)."""

    __slots__ = ("__weakref__", "key")

    def __new__(cls, *key):
        full = (cls, *key)
        ref = _INTERN.get(full)
        if ref is not None:
            node = ref()
            if node is not None:
                return node
        node = object.__new__(cls)
        node.key = full
        ref = _Ref(node, _forget)
        ref.key = full
        _INTERN[full] = ref
        return node

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.key[1:]!r}"

    def __reduce__(self):
        return (type(self), self.key[1:])


class Const(Interned):
    __slots__ = ()

    @property
    def value(self) -> bool:
        return self.key[1]


TRUE = Const(True)
FALSE = Const(False)


class Gram(bytes, Node):
    """The n-gram `gram` (n = the tier's gram size) is present in the tier's bloom.

    Not interned: a gram is its tier byte followed by its bytes, and equal grams are equal values (a
    dictionary or an And/Or key treats them as one). Most nodes of a plan are grams, and an interned
    node costs an object, a key tuple and a weak reference each (as values, cold planning of Yara-Rules
    went from about 2.9 to 2.6 s)."""

    __slots__ = ()

    def __new__(cls, tier: int, gram: bytes) -> Gram:
        return bytes.__new__(cls, TIER_BYTE[tier] + gram)

    @property
    def tier(self) -> int:
        return self[0]

    @property
    def gram(self) -> bytes:
        return self[1:]  # a slice of a bytes subclass is plain bytes

    @property
    def key(self) -> tuple:  # type: ignore[override]
        return (Gram, self[0], self[1:])

    def __repr__(self) -> str:
        return f"Gram{self.key[1:]!r}"

    __str__ = __repr__  # not bytes' own

    def __reduce__(self):
        return (Gram, self.key[1:])


TIER_BYTE = {1: b"\x01", 2: b"\x02"}  # a gram's first byte, per tier (no other tier exists)
# the gram of tier-prefixed bytes (TIER_BYTE + gram), without a Python-level call: for the planner's loops
tiered_gram = partial(bytes.__new__, Gram)


class Filesize(Interned):
    """filesize OP value (exact, from the document row)."""

    __slots__ = ()

    @property
    def op(self) -> str:
        return self.key[1]

    @property
    def value(self) -> int:
        return self.key[2]


class Field(Interned):
    """Module field `name` is defined for the file and `value OP operand` holds (op "&": value & operand
    is non-zero). Exact for files YARA's modules scanned; see `Unscanned`."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self.key[1]

    @property
    def op(self) -> str:
        return self.key[2]

    @property
    def value(self) -> int:
        return self.key[3]


class Unscanned(Interned):
    """The file's module fields are unknown (YARA could not scan it when it was indexed)."""

    __slots__ = ()


class Entropy(Interned):
    """math.entropy(0, filesize) OP value (exact: the stored entropy is computed as YARA computes it)."""

    __slots__ = ()

    @property
    def op(self) -> str:
        return self.key[1]

    @property
    def value(self) -> float:
        return self.key[2]


class Identity(Interned):
    """The file's Source ID is `source_id`."""

    __slots__ = ()

    @property
    def source_id(self) -> bytes:
        return self.key[1]


class ReadInt(Interned):
    """An integer read (uint8/16/32[be], int8/16/32[be]) at a constant offset of the stored first bytes
    (`source` "prefix") or entry-point bytes ("entry"), masked, compared: exact, and FALSE where the file
    is too short for the read, as YARA's read is then undefined."""

    __slots__ = ()

    @property
    def source(self) -> str:
        return self.key[1]

    @property
    def offset(self) -> int:
        return self.key[2]

    @property
    def width(self) -> int:
        return self.key[3]

    @property
    def signed(self) -> bool:
        return self.key[4]

    @property
    def big_endian(self) -> bool:
        return self.key[5]

    @property
    def mask(self) -> int:
        return self.key[6]

    @property
    def op(self) -> str:
        return self.key[7]

    @property
    def value(self) -> int:
        return self.key[8]


class BytesAt(Interned):
    """The stored first bytes ("prefix") or entry-point bytes ("entry") hold, at `offset`, a byte of
    each set of `seq` in turn."""

    __slots__ = ()

    @property
    def source(self) -> str:
        return self.key[1]

    @property
    def offset(self) -> int:
        return self.key[2]

    @property
    def seq(self) -> tuple[int, ...]:
        return self.key[3]


class And(Interned):
    __slots__ = ()

    @property
    def children(self) -> tuple[Node, ...]:
        return self.key[1:]


class Or(Interned):
    __slots__ = ()

    @property
    def children(self) -> tuple[Node, ...]:
        return self.key[1:]


class AtLeast(Interned):
    """At least k of the children hold (children may repeat: each occurrence counts)."""

    __slots__ = ()

    @property
    def k(self) -> int:
        return self.key[1]

    @property
    def children(self) -> tuple[Node, ...]:
        return self.key[2:]


class Not(Interned):
    """Only ever over exact facts: see Approx."""

    __slots__ = ()

    @property
    def child(self) -> Node:
        return self.key[1]


def _flatten(kind: type, items) -> list[Node]:
    """The children of an And/Or over `items`: nested nodes of the same kind opened, each child once, in
    first-seen order (nodes are interned, so equal means identical)."""
    if kind not in map(type, items):  # nothing to open (most calls): de-duplicated in one C call
        return list(dict.fromkeys(items))
    out: dict[Node, None] = {}
    for item in items:
        if type(item) is kind:
            out.update(dict.fromkeys(item.key[1:]))
        else:
            out[item] = None
    return list(out)


def and_(*items: Node) -> Node:
    if len(items) == 2:  # most calls: a node with TRUE is the node
        if items[1] is TRUE:
            return items[0]
        if items[0] is TRUE:
            return items[1]
    elif len(items) == 1:  # a node alone is itself: nodes are built simplified
        return items[0]
    children = _flatten(And, items)
    if FALSE in children:
        return FALSE
    if TRUE in children:
        children.remove(TRUE)
    if not children:
        return TRUE
    return children[0] if len(children) == 1 else And(*children)


def or_(*items: Node) -> Node:
    if len(items) == 2:  # as in and_
        if items[1] is FALSE:
            return items[0]
        if items[0] is FALSE:
            return items[1]
    elif len(items) == 1:
        return items[0]
    children = _flatten(Or, items)
    if TRUE in children:
        return TRUE
    if FALSE in children:
        children.remove(FALSE)
    if not children:
        return FALSE
    return children[0] if len(children) == 1 else Or(*children)


def at_least(k: int, items: list[Node]) -> Node:
    children = [c for c in items if c is not FALSE]
    k -= sum(1 for c in children if c is TRUE)
    children = [c for c in children if c is not TRUE]
    if k <= 0:
        return TRUE
    if k > len(children):
        return FALSE
    if k == 1:
        return or_(*children)
    if k == len(children):
        return and_(*children)
    return AtLeast(k, *children)


def not_(item: Node) -> Node:
    if isinstance(item, Const):
        return FALSE if item.value else TRUE
    if isinstance(item, Not):
        return item.child
    return Not(item)


def field_present(name: str) -> Node:
    """The document has sidecar field `name` (the sidecar keeps exactly the fields defined for it)."""
    return or_(Field(name, "==", 0), Field(name, "!=", 0))


@dataclass(frozen=True)
class Approx:
    """A YARA boolean's bounds, per document: lower => true => upper, and undefined => `undefined`.

    `undefined` defaults to TRUE (may be undefined anywhere): a construct that does not say otherwise
    only loses precision under a double negation, never recall."""

    upper: Node
    lower: Node
    undefined: Node = TRUE

    @staticmethod
    def exact(node: Node) -> Approx:
        """A two-valued fact: true exactly where `node` holds, false elsewhere."""
        return Approx(node, node, FALSE)

    @staticmethod
    def maybe(upper: Node = TRUE, undefined: Node = TRUE) -> Approx:
        """Something only verification can decide; `upper` is what must hold if it is true."""
        return Approx(upper, FALSE, undefined)

    def defined(self) -> Approx:
        """The same bounds on a value YARA never leaves undefined (and, or, of, loops, rule references:
        each counts an undefined operand as false, which the bounds of being true already say)."""
        return Approx(self.upper, self.lower, FALSE)

    def __and__(self, other: Approx) -> Approx:
        return Approx(and_(self.upper, other.upper), and_(self.lower, other.lower), FALSE)

    def __or__(self, other: Approx) -> Approx:
        return Approx(or_(self.upper, other.upper), or_(self.lower, other.lower), FALSE)

    def __invert__(self) -> Approx:
        """YARA's `not`: true where the operand is false, which is neither true nor undefined."""
        return Approx(not_(self.lower), and_(not_(self.upper), not_(self.undefined)), self.undefined)

    @staticmethod
    def at_least(k: int, items: list[Approx]) -> Approx:
        return Approx(at_least(k, [i.upper for i in items]), at_least(k, [i.lower for i in items]), FALSE)


UNKNOWN = Approx.maybe()


def exact_or_unknown(fact: Node, unknown: Node, undefined: Node) -> Approx:
    """A fact that is exact except on documents where `unknown` holds (there it may be anything,
    undefined too); elsewhere YARA's value is undefined only where `undefined` holds (and `fact` does not)."""
    return Approx(or_(fact, unknown), and_(fact, not_(unknown)), or_(undefined, unknown))


def leaves(node: Node, kind: type) -> set[Node]:
    """Every leaf of type `kind` under node (iterative: plans can be deep)."""
    found: set[Node] = set()
    stack, seen = [node], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            found.add(item)
        elif isinstance(item, And | Or | AtLeast):
            stack.extend(item.children)
        elif isinstance(item, Not):
            stack.append(item.child)
    return found
