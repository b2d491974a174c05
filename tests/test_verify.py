"""Verification scans each file with the groups of rules it is a candidate for, and says exactly what
YARA says when it scans the file with every rule."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import yara

import sspry
import sspry.verify
from sspry.query.results import Candidate, RuleResult
from sspry.query.rules import load_rules
from sspry.verify import rule_groups
from tests.conftest import settle


def bundle(tokens: int) -> str:
    rules = [
        'import "math"',
        'import "pe"',
        # yara-x refuses this (a boolean & an integer); yara-python compiles it, and it matches
        'rule refused_by_x { strings: $a = "token-1-" '
        'condition: $a or (pe.exports("Crash") & pe.characteristics) }',
        'private rule helper { strings: $h = "helper-mark" condition: $h }',
        "global rule not_empty { condition: filesize > 0 }",
        'rule needs_helper { strings: $n = "token-0-" condition: $n and helper }',
        "rule broad { condition: filesize > 10 }",
        "rule entropy { condition: math.entropy(0, filesize) > 3 }",
        # no good atom for YARA: scanned over its own candidates only, in a group of its own
        "rule hexy { strings: $a = /[0-9a-f]{12}/ fullword condition: $a }",
        # libyara's fast mode (no string details asked) must still find every match of these
        'rule counted { strings: $a = "token-" condition: #a == 2 and @a[2] > @a[1] + 8 }',
        'rule late { strings: $a = "token-" condition: for any i in (1..#a) : (@a[i] > 26) }',
    ]
    rules += [f'rule t{i} {{ strings: $a = "token-{i}-" condition: $a }}' for i in range(tokens)]
    return "\n".join(rules) + "\n"


def test_a_global_rule_yara_x_refuses_sends_its_groups_to_yara_python() -> None:
    """Verifying without a global rule would call matches what YARA does not match."""
    text = (
        'import "pe"\n'
        'global rule g { condition: filesize > 3 or (pe.exports("Crash") & pe.characteristics) }\n'
        'rule r { strings: $a = "token" condition: $a }\n'
    )
    groups = rule_groups({"r": {b"x"}}, load_rules(rule=text), engine="yara-x")
    assert [(g.names, g.compiled.engine) for g in groups] == [(frozenset({"r"}), "yara")]


def test_a_small_rule_set_is_scanned_without_its_rules_that_have_no_candidates() -> None:
    """A rule without candidates costs its scan time on every file for nothing (Yara-Rules' maldocs/:
    one such regex rule was 3/4 of the time of verifying 25 rules): however few the rules, the groups
    hold only the rules asked about, the global rules and the rules those reference."""
    text = (
        "global rule g { condition: filesize > 0 }\n"
        'private rule helper { strings: $h = "mark" condition: $h }\n'
        'rule asked { strings: $a = "token" condition: $a and helper }\n'
        'rule idle { strings: $r = /\\W\\w+\\s+\\s".+"/ condition: $r }\n'
        "rule slow_apart { strings: $x = /[0-9a-f]{12}/ condition: $x }\n"
    )
    wanted = {"asked": {bytes([i]) for i in range(8)}, "idle": set(), "slow_apart": {b"\x00"}}
    groups = rule_groups(wanted, load_rules(rule=text), engine="yara")
    compiled = {g.names: {r.identifier for r in g.compiled.rules} for g in groups}  # type: ignore[attr-defined]
    # the selective rule without a good atom is scanned over its own candidate only, in a group of its own
    assert compiled == {
        frozenset({"asked"}): {"g", "helper", "asked"},
        frozenset({"slow_apart"}): {"g", "slow_apart"},
    }


@pytest.mark.parametrize("engine", ["yara", "yara-x"])
def test_files_no_module_rule_is_a_candidate_for_are_scanned_without_the_modules(tmp_path, engine) -> None:
    """YARA runs every imported module on every file it scans (pe: about 0.3 ms a small file), so a
    group's rules that name no module, directly or through the rules they need, are also compiled
    without any import, for the files only those rules are candidates for; the verdicts stay YARA's."""
    text = (
        'import "pe"\n'
        'rule pe_rule { strings: $a = "token" condition: $a and not pe.is_pe }\n'
        "private rule helper { condition: pe.number_of_sections == 0 or not pe.is_pe }\n"
        'rule via_helper { strings: $c = "third" condition: $c and helper }\n'
        'rule plain_rule { strings: $b = "other" condition: $b }\n'
    )
    wanted = {"pe_rule": {b"a"}, "via_helper": {b"c"}, "plain_rule": {b"a", b"b", b"c"}}
    [group] = rule_groups(wanted, load_rules(rule=text), engine="yara")
    assert group.plain_names == {"plain_rule"} and group.plain is not None
    assert group.plain_covers("plain_rule") and not group.plain_covers("via_helper")
    modules: list[str] = []
    sample = tmp_path / "sample"
    sample.write_bytes(b"other")
    group.plain.rules.match(str(sample), modules_callback=lambda m: modules.append(m["module"]))  # type: ignore[attr-defined]
    assert modules == []  # pe is not run
    group.compiled.rules.match(str(sample), modules_callback=lambda m: modules.append(m["module"]))  # type: ignore[attr-defined]
    assert modules == ["pe"]

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "a").write_text("token and other")
    (samples / "b").write_text("only other")
    (samples / "c").write_text("third and other")
    settle(samples)
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
        result = db.search(rule=text, verify=True, engine=engine)
    everything = yara.compile(source=text)
    verdicts = {}
    for rule in result.rules:
        for candidate in rule.candidates:
            truth = {m.rule for m in everything.match(candidate.paths[0])}
            assert candidate.verified == (rule.name in truth)
            verdicts[(rule.name, Path(candidate.paths[0]).name)] = candidate.verified
    matched = {key for key, verified in verdicts.items() if verified}
    assert matched == {("pe_rule", "a"), ("via_helper", "c"), *(("plain_rule", name) for name in "abc")}


@pytest.mark.parametrize("engine", ["yara", "yara-x"])
def test_grouped_verification_equals_scanning_with_every_rule(tmp_path, engine) -> None:
    """With either engine (yara-x in worker processes, the rule it refuses verified by yara-python),
    every verdict is yara-python's over the whole bundle."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(60):
        extra = " helper-mark" if i % 3 == 0 else ""
        extra += " 0123456789ab" if i % 10 == 0 else ""
        (samples / f"f{i}").write_text(f"file {i} holds token-{i}- and token-{(i * 7) % 60}-{extra}")
    (samples / "empty").write_bytes(b"")
    settle(samples)
    text = bundle(60)
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
        result = db.search(rule=text, verify=True, engine=engine)
    assert result.verification["engine"] == engine
    assert result.verification["hashed_files"] == 0  # each scanned by path, in the workers for yara-x
    wanted = {r.name: {c.source_id for c in r.candidates} for r in result.rules}
    groups = rule_groups(wanted, load_rules(rule=text), engine=engine)
    # one group for every rule with good atoms (a scan costs a pass over the file whatever its rules),
    # the selective rule without one over its own candidates only
    shared = max(groups, key=lambda g: len(g.names)).names
    apart = {"hexy"} | ({"refused_by_x"} if engine == "yara-x" else set())
    assert shared == {name for name, docs in wanted.items() if docs} - apart
    assert frozenset({"hexy"}) in {g.names for g in groups}
    assert len(wanted["hexy"]) < 60  # narrowed by its run of hex digits
    by_engine = {name: g.compiled.engine for g in groups for name in g.names}
    assert by_engine["refused_by_x"] == "yara" and by_engine["t5"] == engine
    assert result.verification["group_scans"] < len(groups) * result.verification["files"]
    everything = yara.compile(source=text)
    for rule in result.rules:
        for candidate in rule.candidates:
            truth = {m.rule for m in everything.match(candidate.paths[0])}
            assert candidate.verified == (rule.name in truth), (rule.name, candidate.paths)
    matched = {r.name: sum(1 for c in r.candidates if c.verified) for r in result.rules}
    assert matched["needs_helper"] == 1 and matched["broad"] == 60 and matched["t5"] >= 1
    assert matched["refused_by_x"] >= 1 and matched["hexy"] == 6
    assert matched["counted"] == 60 and 0 < matched["late"] < 60


def test_while_files_are_scanned_a_search_holds_one_candidate_per_document(tmp_path, monkeypatch) -> None:
    """Verification holds a rule's candidates as indices into one table of documents until the files
    are scanned (a Candidate per pair is about 250 bytes: a whole rule set names each document hundreds
    of times), then gives every rule its Candidates with their verdicts."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(10):  # the prefilter cannot count: every file is a candidate of every rule
        (samples / f"f{i}").write_text(f"file {i} holds common-text" + (" common-text" if i % 3 == 0 else ""))
    settle(samples)
    text = "\n".join(
        f'rule r{i} {{ strings: $a = "common-text" condition: #a == {1 + i % 2} }}' for i in range(40)
    )
    held: list[int] = []
    scan = sspry.verify.scan_document

    def counting(*args, **kwargs):
        gc.collect()
        held.append(sum(1 for o in gc.get_objects() if isinstance(o, Candidate)))
        return scan(*args, **kwargs)

    monkeypatch.setattr(sspry.verify, "scan_document", counting)
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
        result = db.search(rule=text, verify=True, engine="yara")
    assert len(held) == 10 and max(held) <= 10  # not the 400 (rule, document) pairs
    whole = result.to_json()
    # the summary printed after the rules (--json) is not built from them again
    monkeypatch.setattr(
        RuleResult, "to_json", lambda self: pytest.fail("a rule's JSON built for the summary")
    )
    assert result.summary_json() == {k: v for k, v in whole.items() if k != "rules"}
    assert result.summary_json()["verification"]["files"] == 10
    assert sum(len(r.candidates) for r in result.rules) == 400
    for rule in result.rules:
        twice = int(rule.name[1:]) % 2
        matched = {Path(c.paths[0]).name for c in rule.candidates if c.verified}
        assert matched == {f"f{i}" for i in range(10) if (i % 3 == 0) == twice}, rule.name
        assert all(c.verified is not None and c.path_count == 1 for c in rule.candidates)


@pytest.mark.parametrize("engine", ["yara", "yara-x"])
def test_a_file_that_keeps_its_indexed_stamp_is_scanned_without_being_hashed(tmp_path, engine) -> None:
    """Verification trusts the (size, mtime) recorded at indexing as re-indexing does (document.unchanged):
    a file that still has it is not hashed; one whose mtime moved is hashed, then scanned if it holds
    its document, skipped if not; a file modified moments before it was indexed has no stamp to trust."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("kept", "touched", "rewritten", "restamped"):
        (samples / name).write_text(f"{name} holds token-0-")
    settle(samples)
    (samples / "fresh").write_text("fresh holds token-0-")  # indexed at once: its stamp is racy
    rule = 'rule t { strings: $a = "token-0-" condition: $a }'
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
        os.utime(samples / "touched")  # same content, a new mtime
        (samples / "rewritten").write_text("rewritten lost token-0")
        stamp = (samples / "restamped").stat()
        (samples / "restamped").write_text("restamped holds token-X-")  # same size, its mtime put back:
        os.utime(samples / "restamped", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # taken as unchanged
        result = db.search(rule=rule, verify=True, engine=engine)
    outcomes = {Path(c.paths[0]).name: c.outcome for c in result.rules[0].candidates}
    assert outcomes == {
        "kept": "match",
        "touched": "match",
        "rewritten": "skipped:changed",
        "restamped": "no-match",  # scanned as it is now, unhashed
        "fresh": "match",
    }
    assert result.verification["files"] == 4 and result.verification["hashed_files"] == 2  # touched, fresh
