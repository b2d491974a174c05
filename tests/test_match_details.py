"""What verification reports of a match (--print-strings/--print-tags/--print-meta), against yara-python."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yara

import sspry
from sspry.engines import MATCH_DATA_BYTES, MATCHES_PER_RULE, shown

RULES = """
rule greet : greeting text {
    meta: author = "analyst" score = 7 confirmed = true
    strings: $h = "hello-world" $b = { 01 02 03 }
    condition: $h and $b
}
rule many { strings: $x = "xyzzy" condition: #x > 2 }
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("details")
    files = base / "files"
    files.mkdir()
    (files / "one.bin").write_bytes(b"head hello-world \x01\x02\x03 tail hello-world")
    (files / "long.bin").write_bytes(b"hello-world" + b"A" * 100 + b"\x01\x02\x03")
    (files / "spam.bin").write_bytes(b"xyzzy " * (MATCHES_PER_RULE + 10))
    (files / "none.bin").write_bytes(b"hello-world only")
    root = base / "db"
    with sspry.Database.create(root, store_path=True) as db:
        db.index([str(files)])
    return root


def _yara_matches(path) -> dict[str, list[tuple[int, str, bytes]]]:
    """Rule -> its string matches as yara-python reports them, in offset order."""
    out = {}
    for match in yara.compile(source=RULES).match(str(path)):
        out[match.rule] = sorted(
            (i.offset, s.identifier, i.matched_data) for s in match.strings for i in s.instances
        )
    return out


def test_details_of_each_match_are_yaras(corpus) -> None:
    root = corpus
    with sspry.Database.open(root) as db:
        result = db.search(rule=RULES, verify=True, details=("strings", "tags", "meta"))
    seen = 0
    for rule in result.rules:
        for candidate in rule.candidates:
            truth = _yara_matches(candidate.paths[0]).get(rule.name)
            if truth is None:
                assert candidate.verified is False and candidate.details is None
                continue
            seen += 1
            details = candidate.details
            shown_truth = [
                {"identifier": name, "offset": offset, "data": shown(data[:MATCH_DATA_BYTES])}
                for offset, name, data in truth[:MATCHES_PER_RULE]
            ]
            assert details["matches"] == shown_truth
            assert details.get("matches_truncated", False) == (len(truth) > MATCHES_PER_RULE)
            if rule.name == "greet":
                assert details["meta"] == {"author": "analyst", "score": 7, "confirmed": True}
                assert details["tags"] == ["greeting", "text"]
            else:
                assert details["meta"] == {} and details["tags"] == []
    assert seen == 3  # one.bin and long.bin for greet, spam.bin for many (truncated)
    assert shown(b'a"\\\x00~') == "a\\x22\\x5c\\x00~"


def test_details_need_verification(corpus) -> None:
    root = corpus
    with sspry.Database.open(root) as db, pytest.raises(ValueError, match="verify=True"):
        db.search(rule=RULES, details=("strings",))
    with sspry.Database.open(root) as db, pytest.raises(ValueError, match="unknown match details"):
        db.search(rule=RULES, verify=True, details=("offsets",))


def _cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sspry", *args], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    return done


def test_command_line_prints_the_details(corpus, tmp_path) -> None:
    root = corpus
    rules = tmp_path / "rules.yar"
    rules.write_text(RULES)
    search = ["local", "search", "--root", str(root), "--rule", str(rules), "--verify"]
    out = json.loads(_cli(*search, "--json", "--print-strings", "--print-meta").stdout)
    greet = next(r for r in out["rules"] if r["rule"] == "greet")
    one = next(c for c in greet["candidates"] if c["paths"][0].endswith("one.bin"))
    assert [m["offset"] for m in one["matches"]] == [5, 17, 26] and "tags" not in one
    assert one["meta"]["author"] == "analyst"
    plain = _cli(*search, "--print-strings", "--print-tags").stdout
    assert "\t0x11:$b: \\x01\\x02\\x03" in plain and "\ttags: greeting,text" in plain
    assert "add --verify" in _cli(*search[:-1], "--print-strings", code=2).stderr


def test_scan_mode_engines_agree(tmp_path) -> None:
    """Scan mode with yara-x reports the matches, tags and strings yara-python reports; a file yara-x
    refuses is one line naming it (exit 2)."""
    sample = tmp_path / "one.bin"
    sample.write_bytes(b"head hello-world \x01\x02\x03 tail hello-world")
    rules = tmp_path / "rules.yar"
    rules.write_text(RULES)
    scans = [
        json.loads(
            _cli("--engine", engine, "--rule", str(rules), "--print-strings", "--json", str(sample)).stdout
        )
        for engine in ("yara", "yara-x")
    ]
    assert scans[0] == scans[1] and scans[0]["matches"][0]["rule"] == "greet"
    refused = tmp_path / "refused.yar"
    refused.write_text('import "pe"\nrule bad { condition: pe.exports("Crash") & pe.characteristics }\n')
    assert "yara-x refuses" in _cli("--engine", "yara-x", "--rule", str(refused), str(sample), code=2).stderr
