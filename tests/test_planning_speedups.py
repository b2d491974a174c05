"""The shortcuts of cold planning give what the plain definitions give: variant counts per window, the
plain-hex decoder, and strings planned once per planning call."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from sspry.policy import Policy
from sspry.query.hexstr import _tokens, parse_hex
from sspry.query.literals import MAX_VARIANTS, Lit, _variants
from sspry.query.ruleset import plan_rules

SIZES = st.lists(st.sampled_from([1, 2, 3, 4, 10, 16, 26, 32, 256]), min_size=1, max_size=40)


@given(SIZES, st.integers(1, 8))
def test_variants_per_window_are_capped_products(counts: list[int], n: int) -> None:
    windows = [counts[s : s + n] for s in range(len(counts) - n + 1)]
    assert list(_variants(counts, n)) == [min(math.prod(w), MAX_VARIANTS + 1) for w in windows]


@given(
    st.lists(st.sampled_from(["4D", "5a", "??", "0?", "?F", "00", "ff"]), min_size=1, max_size=30), st.data()
)
def test_plain_hex_bodies_decode_as_the_tokenizer_does(pairs: list[str], data) -> None:
    body = "".join(pair + data.draw(st.sampled_from(["", " ", "  ", "\n", "\t "])) for pair in pairs)
    (kind, sets), *rest = _tokens(body.strip())
    assert kind == "run" and not rest
    assert parse_hex(body) == Lit(tuple(sets))


def test_repeated_strings_plan_alike() -> None:
    source = """
rule a { strings: $x = { 4D 5A ?? 00 01 02 03 } $y = "some text" wide $z = { 4D 5A [2] 00 }
         condition: all of them }
rule b { strings: $p = { 4D 5A ?? 00 01 02 03 } $q = "some text" wide $r = "some text" $s = { 4D 5A [2] 00 }
         condition: all of them }
"""
    a, b = plan_rules(source, ["a", "b"], Policy())
    assert a.strings[0].node is b.strings[0].node and a.strings[1].node is b.strings[1].node
    assert b.strings[2].node is not b.strings[1].node  # ascii is not wide
    assert (b.strings[0].line, b.strings[0].identifier) == (4, "$p")  # where and what stay each string's
    assert a.strings[2].note is not None and a.strings[2].note == b.strings[3].note


def test_a_search_collects_garbage_rarely_until_its_results_are_out(tmp_path) -> None:
    """Searching relaxes the collector's young threshold (ruleset.gc_relaxed) while its results are
    produced, and every search, consumed or abandoned, gives the thresholds back."""
    import gc

    import sspry

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(4):
        (samples / f"f{i}").write_text(f"sample {i} token-{i}")
    rule = "\n".join(f'rule r{i} {{ strings: $a = "token-{i}" condition: $a }}' for i in range(4))
    gc.collect()  # closes any earlier test's abandoned planning iterator: the thresholds are the normal ones
    normal = gc.get_threshold()
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
        stream = iter(db.stream(rule=rule))
        first = next(stream)
        assert first.name == "r0" and gc.get_threshold()[0] > normal[0]
        assert [r.name for r in stream] == ["r1", "r2", "r3"]
        assert gc.get_threshold() == normal
        abandoned = iter(db.stream(rule=rule))
        next(abandoned)
        assert gc.get_threshold()[0] > normal[0]
        del abandoned  # an unfinished stream's generator is closed when dropped
        gc.collect()
        assert gc.get_threshold() == normal
