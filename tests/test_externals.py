"""External variables (-d NAME=VALUE): typed as yara types them, compiled with, planned as constants,
verified with, and carried to servers -- checked against yara-python's own answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yara

import sspry
from sspry.query.externals import ExternalError, parse_define
from tests.test_server import ServerProcess

GATED = """
rule gated { strings: $a = "external-token" condition: $a and flag == 1 }
rule named { strings: $a = "external-token" condition: $a and ext == "match" }
rule enabled_only { strings: $a = "external-token" condition: $a and enabled }
rule sized { strings: $a = "external-token" condition: $a and limit > 10 and ratio < 0.5 }
"""
# yaramod cannot be told a string external, so a string operator on one leaves the file unparsed:
# every rule of it plans as TRUE, and verification still decides with the value
STRING_OPERATOR = 'rule ends { strings: $a = "external-token" condition: $a and ext endswith "tch" }\n'


def test_defines_are_typed_as_yara_types_them() -> None:
    assert parse_define("n=12") == ("n", 12) and parse_define("n=-3") == ("n", -3)
    assert parse_define("n=0x10") == ("n", 16)
    assert parse_define("b=true") == ("b", True) and parse_define("b=false") == ("b", False)
    assert parse_define("f=0.25") == ("f", 0.25)
    assert parse_define("s=hello world") == ("s", "hello world")
    assert parse_define('s="quoted"') == ("s", "quoted") and parse_define("s=") == ("s", "")
    for bad in ("novalue", "1x=2", "a-b=1", "=3"):
        with pytest.raises(ExternalError):
            parse_define(bad)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("externals")
    files = base / "files"
    files.mkdir()
    for i in range(6):
        body = b"header %d " % i + (b"external-token" if i % 2 else b"nothing here") + b" tail"
        (files / f"f{i}.bin").write_bytes(body)
    root = base / "db"
    with sspry.Database.create(root, store_path=True) as db:
        db.index([str(files)])
    return files, root


def _truth(source: str, externals: dict, files) -> dict[str, set[str]]:
    """Rule -> the files yara-python matches with these externals."""
    compiled = yara.compile(source=source, externals=externals)
    found: dict[str, set[str]] = {r.identifier: set() for r in compiled}
    for path in sorted(files.iterdir()):
        for match in compiled.match(str(path)):
            found[match.rule].add(str(path))
    return found


def _by_rule(result) -> dict[str, tuple[set[str], set[str]]]:
    """Rule -> (candidate paths, verified paths)."""
    return {
        r.name: ({c.paths[0] for c in r.candidates}, {c.paths[0] for c in r.candidates if c.verified})
        for r in result.rules
    }


@pytest.mark.parametrize(
    "externals",
    [
        {"flag": 0, "ext": "match", "enabled": False, "limit": 11, "ratio": 0.25},
        {"flag": 1, "ext": "other", "enabled": True, "limit": 3, "ratio": 0.25},
    ],
)
def test_externals_are_planned_as_constants_and_verified_with(corpus, externals) -> None:
    files, root = corpus
    truth = _truth(GATED, externals, files)
    with sspry.Database.open(root) as db:
        found = _by_rule(db.search(rule=GATED, verify=True, externals=externals))
    for rule, matched in truth.items():
        candidates, verified = found[rule]
        assert verified == matched, rule
        if not matched:  # the value rules the rule out before any file is read
            assert candidates == set(), rule
        else:
            assert candidates >= matched


def test_servers_take_the_externals(corpus, tmp_path) -> None:
    files, root = corpus
    externals = {"flag": 1, "ext": "match", "enabled": False, "limit": 20, "ratio": 0.75}
    with sspry.Database.open(root) as db:
        local = _by_rule(db.search(rule=GATED, verify=True, externals=externals))
    served = tmp_path / "served"
    sspry.Database.create(served, store_path=True).close()
    server = ServerProcess(served)
    try:
        with sspry.connect(server.addr) as servers:
            servers.index([str(files)])
            remote = _by_rule(servers.search(rule=GATED, verify=True, externals=externals))
            # the server compiles with them too: without, YARA refuses the rules
            with pytest.raises(sspry.RuleError):
                servers.search(rule=GATED)
    finally:
        assert server.stop() == 0
    assert remote == local
    assert local["gated"][1] and not local["enabled_only"][0] and not local["sized"][0]


def test_plans_are_cached_per_value(corpus) -> None:
    _, root = corpus
    with sspry.Database.open(root) as db:
        on = db.search(rule=GATED, externals={"flag": 1, "ext": "", "enabled": 0, "limit": 0, "ratio": 1})
        off = db.search(rule=GATED, externals={"flag": 0, "ext": "", "enabled": 0, "limit": 0, "ratio": 1})
    assert on.rules[0].candidates and not off.rules[0].candidates


def test_a_string_operator_on_an_external_still_finds_every_match(corpus) -> None:
    files, root = corpus
    externals = {"ext": "match"}
    truth = _truth(STRING_OPERATOR, externals, files)
    with sspry.Database.open(root) as db:
        result = db.search(rule=STRING_OPERATOR, verify=True, externals=externals)
    candidates, verified = _by_rule(result)["ends"]
    assert verified == truth["ends"] and truth["ends"] and candidates >= verified
    assert result.rules[0].notes == ["not-parsed"]


def _cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sspry", *args], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    return done


def test_command_line_defines(corpus, tmp_path) -> None:
    files, root = corpus
    rules = tmp_path / "gated.yar"
    rules.write_text(GATED)
    defines = ["-d", "flag=0", "-d", "ext=match", "-d", "enabled=true", "-d", "limit=5", "-d", "ratio=0.1"]
    out = json.loads(
        _cli("local", "search", "--root", str(root), "--rule", str(rules), "--json", *defines).stdout
    )
    counts = {r["rule"]: r["candidate_count"] for r in out["rules"]}
    assert (
        counts["gated"] == 0 and counts["sized"] == 0 and counts["named"] == 3 and counts["enabled_only"] == 3
    )
    # YARA's refusal names the missing external and the fix, in one line (exit 2)
    missing = _cli("local", "search", "--root", str(root), "--rule", str(rules), code=2).stderr
    assert "undefined identifier" in missing and "-d NAME=VALUE" in missing
    assert "expected NAME=VALUE" in _cli("rule-check", "--rule", str(rules), "-d", "flag", code=2).stderr
    check = json.loads(_cli("rule-check", "--rule", str(rules), "--json", *defines).stdout)
    assert {r["rule"]: r["status"] for r in check["rules"]}["gated"] == "searchable"
    # scan mode passes them to YARA
    scanned = _cli("-d", "flag=1", *defines[2:], "--rule", str(rules), "--json", str(files)).stdout
    matched = {json.loads(line)["file"] for line in scanned.splitlines() if json.loads(line)["matched"]}
    assert matched == {str(files / f"f{i}.bin") for i in (1, 3, 5)}
