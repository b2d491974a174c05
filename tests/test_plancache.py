"""The plan cache: a cached plan is the plan planning would make, a changed dependency is never served
stale, and the cache never fails a search."""

from __future__ import annotations

import sqlite3

import pytest

import sspry.query.ruleset as ruleset
from sspry.policy import Policy
from sspry.query import planformat
from sspry.query.plan import TRUE, Filesize, and_
from sspry.query.plancache import FILENAME, PlanCache
from sspry.query.ruleset import plan_rules

POLICY = Policy()
MODULES = 'import "pe"\nimport "math"\nimport "hash"\nimport "time"\n'
# every kind of plan node, note and string plan the format has to carry
EVERYTHING = (
    MODULES
    + """
rule texts {
    strings:
        $a = "needle-one" nocase wide ascii
        $b = { 4D 5A ?? 00 [2-4] ( 90 | 6? ) ~00 }
        $c = /ab[cd]e+f.{2}gh/
        $d = "ab"
    condition:
        2 of ($a, $b, $c) and $a at 0 and $b in (0..4) and #c > 1 and not $d
}
rule facts {
    condition:
        filesize < 10KB and uint16(0) == 0x5A4D and pe.number_of_sections > 2 and pe.is_dll()
        and math.entropy(0, filesize) > 7.0 and pe.characteristics & 0x2000
        and hash.sha256(0, filesize) == "00000000000000000000000000000000000000000000000000000000000000ff"
        and uint32(pe.entry_point) == 0x90909090 and not (filesize == 3)
}
rule refers { condition: texts or (facts and filesize > 10) }
"""
)


def same(a, b) -> None:
    """Two RulePlans are the same plan: interned nodes make equal formulas identical objects."""
    assert a.name == b.name
    assert a.upper is b.upper
    assert [(n.code, n.text, n.line, n.column) for n in a.notes] == [
        (n.code, n.text, n.line, n.column) for n in b.notes
    ]
    assert a.strings == b.strings


def plan(text: str, targets, cache=None, **options):
    return plan_rules(text, targets, POLICY, now=1_700_000_000, cache=cache, **options)


def test_cached_plans_are_the_plans(tmp_path) -> None:
    targets = ["texts", "facts", "refers"]
    fresh = plan(EVERYTHING, targets)
    assert all(p.upper is not TRUE for p in fresh) and fresh[0].notes  # something to compare
    cache = PlanCache(tmp_path)
    for p, q in zip(fresh, plan(EVERYTHING, targets, cache), strict=True):  # planned and stored
        same(p, q)
    assert (cache.hits, cache.misses) == (0, 3)
    for p, q in zip(fresh, plan(EVERYTHING, targets, cache), strict=True):  # from memory
        same(p, q)
    assert cache.hits == 3
    cache.close()
    reopened = PlanCache(tmp_path)  # a restarted server: from disk
    for p, q in zip(fresh, plan(EVERYTHING, targets, reopened), strict=True):
        same(p, q)
    assert (reopened.hits, reopened.misses) == (3, 0)


def test_format_round_trip_and_version() -> None:
    (fresh,) = plan(EVERYTHING, ["texts"])
    data = planformat.encode(fresh, 5)
    same(planformat.decode(data, "texts", 5), fresh)
    moved = planformat.decode(data, "texts", 15)
    assert [n.line for n in moved.notes] == [n.line + 10 if n.line else 0 for n in fresh.notes]
    with pytest.raises(planformat.FormatError):
        planformat.decode(data.replace(b'"v":1', b'"v":99'), "texts", 5)
    with pytest.raises(planformat.FormatError):
        planformat.decode(data[:-10], "texts", 5)


def test_a_changed_reference_or_global_is_never_served_stale(tmp_path) -> None:
    cache = PlanCache(tmp_path)
    template = """
{g}rule helper {{ condition: filesize < {size} }}
rule user {{ strings: $a = "needle-one" condition: $a and helper }}
"""
    for size, global_ in ((100, ""), (200, ""), (200, "global "), (300, "global ")):
        text = template.format(size=size, g=global_)
        (cached,) = plan(text, ["user"], cache)
        (fresh,) = plan(text, ["user"])
        same(cached, fresh)
        assert Filesize("<", size) in cached.upper.children
    # a global rule added to the file changes the plan of a rule that does not name it
    text = template.format(size=100, g="") + "global rule gate { condition: filesize > 5 }\n"
    (cached,) = plan(text, ["user"], cache)
    same(cached, plan(text, ["user"])[0])
    assert Filesize(">", 5) in cached.upper.children
    # and the same rule text under other options is planned again
    (narrow,) = plan(text, ["user"], cache, max_anchors=1)
    same(narrow, plan(text, ["user"], max_anchors=1)[0])


def test_a_rule_that_moved_keeps_exact_positions(tmp_path) -> None:
    cache = PlanCache(tmp_path)
    rule = 'rule r {\n strings: $a = "ab"\n condition: $a and pe.sections[0].name == ".text"\n}\n'
    plan('import "pe"\n' + rule, ["r"], cache)
    moved = 'import "pe"\n' + "".join(f"rule other{i} {{ condition: true }}\n" for i in range(3)) + rule
    (cached,) = plan(moved, ["r"], cache)
    assert cache.hits == 1
    same(cached, plan(moved, ["r"])[0])
    assert cached.notes and all(n.line >= 5 for n in cached.notes)


def test_plans_that_depend_on_the_time_are_not_kept(tmp_path) -> None:
    cache = PlanCache(tmp_path)
    text = (
        MODULES
        + """
rule soon { condition: pe.timestamp > time.now() }
rule uses { condition: soon and filesize > 1 }
rule plain { condition: filesize > 2 }
"""
    )
    plan(text, ["soon", "uses", "plain"], cache)
    (later,) = plan_rules(text, ["uses"], POLICY, now=1_900_000_000, cache=cache)
    same(later, plan_rules(text, ["uses"], POLICY, now=1_900_000_000)[0])
    plan(text, ["plain"], cache)
    assert cache.hits == 1  # only `plain`


def test_a_source_seen_before_is_not_parsed_again(tmp_path, monkeypatch) -> None:
    cache = PlanCache(tmp_path)
    targets = ["texts", "facts", "refers"]
    fresh = plan(EVERYTHING, targets, cache)

    parses = []
    real = ruleset.yaramod_parser
    monkeypatch.setattr(ruleset, "yaramod_parser", lambda: parses.append(1) or real())
    for p, q in zip(fresh, plan(EVERYTHING, targets, PlanCache(tmp_path)), strict=True):
        same(p, q)
    assert not parses
    for p, q in zip(fresh, plan(EVERYTHING + "\n", targets, cache), strict=True):  # other text: parsed
        same(p, q)
    assert parses == [1] and cache.hits == 3


def test_a_callers_parse_of_the_text_is_used(tmp_path, monkeypatch) -> None:
    parsed = ruleset.yaramod_parser().parse_string(EVERYTHING)
    fresh = plan(EVERYTHING, ["texts"])
    monkeypatch.setattr(ruleset, "yaramod_parser", lambda: pytest.fail("parsed again"))
    cache = PlanCache(tmp_path)
    for p, q in zip(fresh, plan(EVERYTHING, ["texts"], cache, parsed=parsed), strict=True):
        same(p, q)
    assert cache.misses == 1 and len(cache) == 1


def test_the_cache_never_fails_a_search(tmp_path) -> None:
    targets = ["texts", "facts"]
    fresh = plan(EVERYTHING, targets)
    plan(EVERYTHING, targets, PlanCache(tmp_path))
    with sqlite3.connect(tmp_path / FILENAME) as db:  # damaged entries are misses
        db.execute("UPDATE plans SET plan = x'7b7b'")
    damaged = PlanCache(tmp_path)
    for p, q in zip(fresh, plan(EVERYTHING, targets, damaged), strict=True):
        same(p, q)
    assert damaged.hits == 0
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    unusable = PlanCache(blocked / "plans")  # memory only
    assert unusable.disk_error
    for p, q in zip(fresh, plan(EVERYTHING, targets, unusable), strict=True):
        same(p, q)
    assert plan(EVERYTHING, targets, unusable)[0].upper is fresh[0].upper and unusable.hits == 2


def test_memory_is_bounded() -> None:
    cache = PlanCache(None, memory_entries=2)
    text = "".join(f"rule r{i} {{ condition: filesize == {i} }}\n" for i in range(5))
    plans = plan(text, [f"r{i}" for i in range(5)], cache)
    assert len(cache) == 2
    assert plans[4].upper is and_(Filesize("==", 4))


def test_local_searches_keep_their_plans_beside_the_forest(tmp_path) -> None:
    import sspry

    files = tmp_path / "files"
    files.mkdir()
    (files / "a.bin").write_bytes(b"xx needle-one yy" * 10)
    (files / "b.bin").write_bytes(b"nothing to see" * 10)
    rule = 'rule r { strings: $a = "needle-one" condition: $a and filesize < 1KB }'
    root = tmp_path / "forest"
    with sspry.Database.create(root) as db:
        db.index([str(files)])
        first = db.search(rule=rule)
    with sspry.Database.open(root) as db:  # a new process would see the same: the plans are on disk
        again = db.search(rule=rule)
        assert db._plan_cache is not None and db._plan_cache.hits == 1
    assert (root / "plans" / FILENAME).is_file()
    assert [c.source_id for c in first.rules[0].candidates] == [
        c.source_id for c in again.rules[0].candidates
    ]
    assert len(again.rules[0].candidates) == 1
