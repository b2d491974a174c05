"""The planner: hex and regex lowering, literal factors, conditions, and soundness against yara-python."""

from __future__ import annotations

import hashlib
import pickle
import random

import pytest
import yara
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sspry.policy import Policy
from sspry.query.hexstr import HexError, parse_hex
from sspry.query.literals import ANY, Alt, Cat, GramMapper, Lit, Rep, byte, literal, pattern_plan
from sspry.query.plan import FALSE, TRUE, Approx, Filesize, Gram, and_, at_least, not_, or_
from sspry.query.terms import int_literal
from tests.planeval import Facts, plans_for

POLICY = Policy()


def holds(node, data: bytes, policy: Policy = POLICY) -> bool:
    return Facts(data, policy).holds(node)


def test_hex_grammar() -> None:
    pattern = parse_hex("4D 5A ?? 9? [2-4] ( AA | BB CC ) ~00 [-] 01")
    assert isinstance(pattern, Cat)
    lit, jump, alt, neg, open_jump, tail = pattern.items
    assert lit == Lit((byte(0x4D), byte(0x5A), ANY.seq[0], sum(byte(0x90 | i) for i in range(16))))
    assert jump == Rep(ANY, 2, 4)
    assert alt == Alt((literal(b"\xaa"), literal(b"\xbb\xcc")))
    assert neg.seq[0].bit_count() == 255
    assert open_jump == Rep(ANY, 0, None)
    assert tail == literal(b"\x01")
    assert parse_hex("4D5A\n  90") == literal(b"MZ\x90")
    assert parse_hex("( 01 | ( 02 | 03 04 ) ) [5-] ?A") == Cat(
        (
            Alt((literal(b"\x01"), Alt((literal(b"\x02"), literal(b"\x03\x04"))))),
            Rep(ANY, 5, None),
            Lit((sum(byte(h << 4 | 0xA) for h in range(16)),)),
        )
    )
    for bad in ("4D 5", "( 4D", "4D )", "[]", "[5-2]", "ZZ"):
        with pytest.raises(HexError):
            parse_hex(bad)


def test_literal_factors_cut_at_variable_parts() -> None:
    mapper = GramMapper(POLICY.gram_sizes, 64)
    # /xab+cdy/: must not demand "xabcdy" minus the b run (the original dropped the +), only "xab" and "bcdy"
    node = pattern_plan(Cat((literal(b"xa"), Rep(literal(b"b"), 1, None), literal(b"cdy"))), mapper)
    assert holds(node, b"..xabbbbbcdy..")
    assert holds(node, b"xabcdy")
    assert not holds(node, b"xacdy")
    # a{0,3} and * contribute nothing, alternatives OR
    node = pattern_plan(
        Cat((literal(b"head"), Rep(ANY, 0, None), Alt((literal(b"tail1"), literal(b"TAIL2"))))), mapper
    )
    assert holds(node, b"head....TAIL2") and holds(node, b"headtail1")
    assert not holds(node, b"head tail3")
    # short literals give no grams at all
    assert pattern_plan(literal(b"ab"), mapper) is TRUE


def test_plan_algebra_simplifies() -> None:
    a, b = Gram(1, b"abc"), Gram(1, b"bcd")
    assert and_(a, TRUE, and_(b, a)) is and_(a, b)
    assert or_(a, TRUE) is TRUE
    assert at_least(2, [a, b, TRUE]) is or_(a, b)
    assert at_least(3, [a, b]).__class__.__name__ == "Const"
    assert not_(not_(Filesize("<", 5))) is Filesize("<", 5)
    # three-valued: "not $a" cannot prune, "not (filesize < 5)" can
    string = Approx.maybe(a, undefined=FALSE)
    assert (~string).upper is TRUE
    assert (~Approx.exact(Filesize("<", 5))).upper is not_(Filesize("<", 5))
    assert (~~string).upper is a
    # YARA's undefined: `not x` is undefined where x is, so `not not x` may hold wherever x may be
    # undefined (here anywhere: `@a[1] == 0` needs $a, but is undefined without it)
    offset = Approx.maybe(a)
    assert (~offset).lower is FALSE and (~~offset).upper is TRUE
    # and `and` counts an undefined operand as false: not ((not $a) and not (@a[1] == 0)) holds without $a
    assert (~string & ~offset).undefined is FALSE and (~(~string & ~offset)).upper is TRUE


def test_grams_are_values_of_their_tier() -> None:
    """Grams are not interned: equal grams built apart are one child of an And, and so is the And."""
    a, again = Gram(1, b"abc"), Gram(1, b"abc")
    assert a is not again and a == again and hash(a) == hash(again)
    assert and_(a, Gram(1, b"bcd"), again).children == (a, Gram(1, b"bcd"))
    assert and_(a, Gram(1, b"bcd")) is and_(again, Gram(1, b"bcd"))
    other_tier = Gram(2, b"abc")
    assert other_tier != a and (other_tier.tier, other_tier.gram) == (2, b"abc")
    assert len(and_(a, other_tier).children) == 2
    assert a.key == (Gram, 1, b"abc") and repr(a) == str(a) == "Gram(1, b'abc')"
    assert pickle.loads(pickle.dumps(a)) == a and type(pickle.loads(pickle.dumps(a))) is Gram


def test_int_literals_follow_yara() -> None:
    assert int_literal("10KB") == 10240
    assert int_literal("2MB") == 2 << 20
    assert int_literal("0x10") == 16
    assert int_literal("0o17") == 15
    assert int_literal("12") == 12
    assert int_literal("0100") == 100  # YARA reads leading zeros as decimal; octal is 0o
    # and YARA agrees: 0100 bytes of room, not 64
    assert yara.compile(source='rule r { strings: $a = "ab" condition: $a in (0..0100) }').match(
        data=b"x" * 90 + b"ab"
    )
    assert int_literal("abc") is None


def test_conditions() -> None:
    source = r"""
    rule strings_and_size {
        strings: $a = "needle-one" $b = "needle-two" condition: $a and $b and filesize < 1KB
    }
    rule any_of { strings: $a = "needle-one" $b = "needle-two" condition: any of them }
    rule negation { strings: $a = "needle-one" condition: not $a }
    rule counts { strings: $a = "needle-one" condition: #a >= 2 or #a < 1 }
    rule count_needs { strings: $a = "needle-one" condition: #a > 1 }
    rule loop { strings: $a = "needle-one" $b = "needle-two" condition: for any of ($a, $b) : ($ at 0) }
    private rule helper { strings: $a = "needle-two" condition: $a }
    rule reference { condition: helper and filesize > 10 }
    rule none_of { strings: $a = "needle-one" condition: none of them }
    """
    plans = plans_for(
        source,
        ["strings_and_size", "any_of", "negation", "counts", "count_needs", "loop", "reference", "none_of"],
        POLICY,
    )
    one, two, both = b"xx needle-one xx", b"xx needle-two xx", b"needle-one needle-two"
    assert holds(plans["strings_and_size"], both) and not holds(plans["strings_and_size"], one)
    assert not holds(plans["strings_and_size"], both + b"x" * 1024)  # 10KB-style sizes are exact
    assert holds(plans["any_of"], one) and holds(plans["any_of"], two) and not holds(plans["any_of"], b"none")
    assert plans["negation"] is TRUE and plans["counts"] is TRUE and plans["none_of"] is TRUE
    assert holds(plans["count_needs"], one) and not holds(plans["count_needs"], two)
    # decided from the stored first bytes: a string at 0, not merely somewhere
    assert holds(plans["loop"], both) and holds(plans["loop"], two[3:]) and not holds(plans["loop"], one)
    assert holds(plans["reference"], two) and not holds(plans["reference"], one)


def test_count_comparisons_need_their_strings() -> None:
    """A count compared with another count needs the strings the comparison rules out being absent."""
    source = r"""
    rule more { strings: $s1 = "needle-one" $sn1 = "needle-two" condition: #s1 > #sn1 + 2 }
    rule sums { strings: $x1 = "needle-one" $x2 = "needle-two" $fp = "needle-six"
                condition: (#x1 + #x2) > (#fp + 0) }
    rule fewer { strings: $a = "needle-one" $b = "needle-two" condition: #a < #b }
    rule either { strings: $a = "needle-one" $b = "needle-two" condition: #a != #b }
    """
    plans = plans_for(source, ["more", "sums", "fewer", "either"], POLICY)
    one, two, six = b"xx needle-one xx", b"xx needle-two xx", b"xx needle-six xx"
    assert holds(plans["more"], one) and not holds(plans["more"], two)
    assert holds(plans["sums"], one) and holds(plans["sums"], two) and not holds(plans["sums"], six)
    assert holds(plans["fewer"], two) and not holds(plans["fewer"], one)  # #b > #a >= 0
    assert plans["either"] is TRUE  # either string may be the one that occurs


def test_global_rules_apply_to_every_rule() -> None:
    source = r"""
    global rule small { condition: filesize < 100 }
    rule r { strings: $a = "needle-one" condition: $a }
    """
    plan = plans_for(source, ["r"], POLICY)["r"]
    assert holds(plan, b"needle-one") and not holds(plan, b"needle-one" + b"x" * 200)


# --- soundness against yara-python --------------------------------------------------------------------
ALPHABET = b"abcdefghijABCDEFGHIJ0123456789 _-./\x00\x01\xff"


def _text_rule(data: bytes, modifiers: list[str]) -> str:
    escaped = "".join(f"\\x{b:02x}" for b in data)
    return f'"{escaped}" {" ".join(modifiers)}'


def _hex_rule(data: bytes, rng: random.Random) -> str:
    parts = []
    for i, b in enumerate(data):
        roll = rng.random() if 0 < i < len(data) - 1 else 1.0  # YARA: no jump or wildcard at the ends
        if roll < 0.1:
            parts.append("??")
        elif roll < 0.15:
            parts.append(f"{b >> 4:X}?")
        elif roll < 0.2:
            parts.append(f"[0-2] {b:02X}")
        elif roll < 0.25:
            parts.append(f"( {b:02X} | {(b + 1) % 256:02X} 00 )")
        else:
            parts.append(f"{b:02X}")
    return "{ " + " ".join(parts) + " }"


def _regex_rule(data: bytes, rng: random.Random) -> str:
    out = []
    for b in data:
        char = f"\\x{b:02x}"
        roll = rng.random()
        if roll < 0.1:
            out.append(f"{char}+")
        elif roll < 0.15:
            out.append(f"{char}?")
        elif roll < 0.2:
            out.append(".")
        elif roll < 0.25:
            out.append(f"[{char}\\x41-\\x43]")
        elif roll < 0.3:
            out.append(f"({char}|zz)")
        elif roll < 0.33:
            out.append(f"{char}{{1,3}}")
        else:
            out.append(char)
    return "/" + "".join(out) + "/"


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """A variant of `data` that some of the generated patterns still match."""
    out = bytearray()
    for b in data:
        roll = rng.random()
        if roll < 0.1:
            out += bytes([b]) * rng.randrange(1, 4)
        elif roll < 0.2 and (0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A):
            out.append(ord(chr(b).swapcase()))
        else:
            out.append(b)
    return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    needle=st.binary(min_size=3, max_size=14).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b)),
    seed=st.integers(0, 2**32),
    gram_pair=st.sampled_from([(3, 4), (4, 5), (7, 8)]),
    max_anchors=st.sampled_from([1, 4, 16]),
)
def test_plans_hold_whenever_yara_matches(needle: bytes, seed: int, gram_pair, max_anchors: int) -> None:
    rng = random.Random(seed)
    policy = Policy(gram_sizes=gram_pair)
    modifier_sets = [
        [],
        ["nocase"],
        ["wide"],
        ["wide", "ascii"],
        ["nocase", "wide"],
        ["xor(1-3)"],
        ["fullword"],
    ]
    strings = [f"$t{i} = {_text_rule(needle, m)}" for i, m in enumerate(modifier_sets)]
    strings.append(f"$h = {_hex_rule(needle, rng)}")
    strings.append(f"$r = {_regex_rule(needle, rng)}")
    strings.append(f"$ri = {_regex_rule(needle, rng)} nocase wide ascii")
    names = [s.split(" ")[0] for s in strings]
    rules = [f"rule r_{n[1:]} {{ strings: {s} condition: {n} }}" for n, s in zip(names, strings, strict=True)]
    rules.append(
        f"rule r_two {{ strings: {strings[0]} {strings[7]} condition: 1 of them and filesize < 4KB }}"
    )
    source = "\n".join(rules)
    compiled = yara.compile(source=source)
    plans = plans_for(source, [r.identifier for r in compiled], policy, max_anchors)

    def wrap(body: bytes) -> bytes:
        return rng.randbytes(rng.randrange(0, 20)) + body + rng.randbytes(rng.randrange(0, 20))

    variant = _mutate(needle, rng)
    samples = [
        wrap(needle),
        wrap(variant),
        wrap(bytes(b ^ 0x20 if 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A else b for b in needle)),
        wrap(needle.decode("latin-1").encode("utf-16-le")),
        wrap(needle.upper().decode("latin-1").encode("utf-16-le")),
        wrap(bytes(b ^ 2 for b in needle)),
        wrap(rng.randbytes(len(needle))),
    ]
    for data in samples:
        facts = Facts(data, policy)
        for match in compiled.match(data=data):
            assert facts.holds(plans[match.rule]), (match.rule, data, source)


# --- random conditions ------------------------------------------------------------------------------
_OPS = ["==", "!=", "<", "<=", ">", ">="]
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _atoms(draw_int) -> tuple[list[str], list[str]]:
    """(atoms YARA always defines, atoms it may leave undefined)"""
    n = draw_int(0, 6)
    i = draw_int(1, 3)
    op = _OPS[draw_int(0, 5)]
    defined = [
        "$a",
        "$b",
        "$c",
        f"#a {op} {n % 3}",
        f"#a {op} #b + {n % 3}",
        f"(#a + #c) {op} (#b - {n % 2})",
        f"#c - {n % 3} {op} #a",
        f"$b in (0..0{n}0)",  # a leading zero is still decimal
        f"$a at {n}",
        f"$b in ({n}..{n + 4})",
        f"filesize {op} {n * 10 + 20}",
        f"filesize - {n} {op} 40",
        f"uint8({n}) {op} 0x6e",
        f"uint16({n}) {op} 0x656e",
        f"uint32be({n}) == 0x6e656564",
        f"int8({n}) < 0",
        f"math.entropy(0, filesize) {op} {n}.5",
        "any of them",
        "all of them",
        "none of them",
        "2 of ($a, $b, $c)",
        f"for any of ($a, $b) : ($ at {n})",
        f"for all i in (1..#a) : (@a[i] > {n})",
        f"for any i in (1..#a) : (@a[i] {op} {n})",
        "true",
        "false",
        "u",  # a rule that is undefined without its string, and never undefined as a reference
    ]
    # Values YARA leaves undefined wherever the match, byte or field they need is not there: `not`
    # keeps them undefined, `and`/`or`/`of`/loops count them as false (see plan.Approx).
    undefined = [
        f"@a[{i}] {op} {n}",
        f"!c[{i}] {op} {n + 3}",
        f"@b[1] + {n} {op} 10",
        f"$a at @b[{i}]",
        f"$c in (0..@a[{i}])",
        f"any of ($a, $b) at !c[{i}]",
        f"any of them in ({n}..@c[1])",
        f"for any of ($a, $c) : (@ {op} {n})",
        f"for any i in (1..3) : (!c[i] {op} {n + 5})",
        f"for none i in (1..{i}) : (@a[i] {op} {n})",
        f"uint8({n * 10}) {op} 0x65",
        f"uint32(filesize - {n}) {op} 0",
        f"uint16be(filesize + {n}) == 0",
        f"uint32({n * 10 + 70}) == 0x6c64656e",  # past the stored first bytes: planned from grams
        f"pe.number_of_sections {op} {n}",
        "pe.is_dll()",
        "pe.characteristics & pe.DLL",
        f"uint8(pe.entry_point + {n}) == 0x65",
        "$a at pe.entry_point",
        f'hash.sha256(0, filesize) {"==" if n % 2 else "!="} "{_EMPTY_SHA256}"',
        "defined @a[1]",
    ]
    return defined, undefined


@st.composite
def conditions(draw, depth: int = 0) -> str:
    """Nested not/and/or over the atoms, half of them ones YARA may leave undefined, with `not (L and R)`
    and `not (L or R)` drawn as often as `and`, `or` and `not`: an undefined value only shows through a
    `not` above an `and`/`or` (or a rule reference) above another `not`."""

    def draw_int(lo: int, hi: int) -> int:
        return draw(st.integers(lo, hi))

    if depth >= 3 or draw(st.integers(0, 9)) >= 7:
        return draw(st.sampled_from(_atoms(draw_int)[draw(st.integers(0, 1))]))
    left = draw(conditions(depth + 1))
    kind = draw(st.sampled_from(["and", "or", "not", "not and", "not or"]))
    if kind == "not":
        return f"not ({left})"
    right = draw(conditions(depth + 1))
    if kind.startswith("not "):
        return f"not (({left}) {kind[4:]} ({right}))"
    return f"({left}) {kind} ({right})"


def _random_rules(condition: str, nocase: bool) -> str:
    return (
        'import "math"\nimport "pe"\nimport "hash"\n'
        'private rule u { strings: $u = "needle" condition: not (@u[1] == 3) }\n'
        f'rule r {{ strings: $a = "needle" {"nocase" if nocase else ""} $b = {{ 6E 65 ?? 64 6C 65 }} '
        f"$c = /ne+dle[0-9]/ condition: ({condition}) or (false and $a and $b and $c) }}"
    )


def _sound(source: str, data: bytes) -> bool:
    """False only for a false negative: yara-python matches `data` with rule r, its plan does not hold."""
    if not yara.compile(source=source).match(data=data):
        return True
    return Facts(data, POLICY).holds(plans_for(source, ["r"], POLICY)["r"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(condition=conditions(), seed=st.integers(0, 2**32), nocase=st.booleans())
def test_random_conditions_hold_whenever_yara_matches(condition: str, seed: int, nocase: bool) -> None:
    rng = random.Random(seed)
    source = _random_rules(condition, nocase)
    compiled = yara.compile(source=source)
    plan = plans_for(source, ["r"], POLICY)["r"]
    for _ in range(6):
        data = bytearray(rng.randbytes(rng.randrange(0, 80)))
        for _ in range(rng.randrange(0, 3)):
            at = rng.randrange(0, len(data) + 1)
            data[at:at] = rng.choice([b"needle", b"NeEdLe", b"needle7", b"neXdle", b"neeedle1"])
        data = bytes(data)
        if compiled.match(data=data):
            assert Facts(data, POLICY).holds(plan), (condition, data, plan)


# Conditions YARA matches on their sample only through an undefined value (the first one was found by the
# test above): with `not` of an undefined value taken as true where it was false, each was a false negative.
NO_NEEDLE = b"xx neeedle1 yy"  # $c matches, $a and $b do not (yet it has every 3-gram of $b)
UNDEFINED_CASES = [
    ("not ((not $a) and (not (@a[1] == 0)))", NO_NEEDLE),
    ("not ((not (@a[1] == 0)) and true)", NO_NEEDLE),
    ("not ((not (!a[1] == 6)) or false)", NO_NEEDLE),
    ("not ((not (@a[1] > 5)) and filesize > 5)", NO_NEEDLE),
    ("not ((not (uint32(12) == 0x7979)) and true)", NO_NEEDLE),  # reads past the end
    ("not ((not (uint32(100) == 0)) and true)", NO_NEEDLE),
    ("not ((not ($a at @b[1])) and true)", NO_NEEDLE),  # undefined locations
    ("not ((not ($a in (0..@b[1]))) and true)", NO_NEEDLE),
    ("not ((not (any of ($a) in (0..!a[1]))) and true)", NO_NEEDLE),
    ("not (for any of ($a) : (not (@ == 0)))", NO_NEEDLE),
    ("not ((not (pe.number_of_sections == 2)) and true)", NO_NEEDLE),  # module fields of a non-PE file
    ("not ((not pe.is_dll()) and true)", NO_NEEDLE),
    ("not ((not (pe.characteristics & pe.DLL)) and true)", NO_NEEDLE),
    ("not ((not (uint8(pe.entry_point) == 0)) and true)", NO_NEEDLE),
    ("not ((not ($a at pe.entry_point)) and true)", NO_NEEDLE),
    (f'not ((not (hash.sha256(0, filesize) != "{_EMPTY_SHA256}")) and true)', b""),  # empty file
    ("not u", NO_NEEDLE),  # u is undefined there, so not matched, whatever its `not` says
]


@pytest.mark.parametrize(("condition", "data"), UNDEFINED_CASES)
def test_undefined_values_never_cost_recall(condition: str, data: bytes) -> None:
    source = _random_rules(condition, nocase=False)
    assert yara.compile(source=source).match(data=data), "YARA should match: the case tests nothing"
    assert _sound(source, data)
