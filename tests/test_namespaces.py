"""Several rule files, each in a YARA namespace of its own: rules of the same name in two files are two
rules, a global rule restricts only the rules of its file, and every answer (search, verification with
either engine, a server, rule-check, scan mode) names them `namespace:rule` as yara's matches do."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yara
from click.testing import CliRunner

import sspry
from sspry.cli import main
from sspry.query.rules import DEFAULT_NAMESPACE, RuleError, rule_specs
from tests.test_server import ServerProcess

SMALL_ONLY = (
    "global rule small { condition: filesize < 100 }\n"
    'rule r { strings: $a = "needle" condition: $a }\n'
    'rule wide_only { strings: $w = "needle" wide condition: $w }\n'
)
ANY_SIZE = 'rule r { strings: $a = "needle" condition: $a }\nrule other { condition: filesize > 150 }\n'


@pytest.fixture
def layout(tmp_path: Path) -> dict:
    """Two rule files in a directory (one in a subdirectory, one with a global rule), the files to search
    and a forest of them."""
    rules = tmp_path / "rules"
    (rules / "sub").mkdir(parents=True)
    (rules / "a.yar").write_text(SMALL_ONLY)
    (rules / "sub" / "b.yara").write_text(ANY_SIZE)
    (rules / "notes.txt").write_text("not a rule file")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "short").write_bytes(b"a needle here")
    (samples / "long").write_bytes(b"a needle in a long file " + b"." * 200)
    (samples / "none").write_bytes(b"nothing" * 40)
    with sspry.Database.create(tmp_path / "db", store_path=True) as db:
        db.index([str(samples)])
    return {"rules": rules, "samples": samples, "db": tmp_path / "db", "tmp": tmp_path}


def yara_truth(rules: Path, samples: Path) -> dict[str, set[bytes]]:
    """`namespace:rule` -> the documents yara-python matches, with the files compiled as rule_specs says."""
    compiled = yara.compile(
        filepaths={"a.yar": str(rules / "a.yar"), "sub/b.yara": str(rules / "sub/b.yara")}
    )
    found: dict[str, set[bytes]] = {}
    for path in samples.iterdir():
        data = path.read_bytes()
        for match in compiled.match(data=data):
            found.setdefault(f"{match.namespace}:{match.rule}", set()).add(hashlib.sha256(data).digest())
    return found


def by_name(result) -> dict[str, set[bytes]]:
    return {r.name: {c.source_id for c in r.candidates} for r in result.rules}


def test_namespaces_are_named_after_paths(layout) -> None:
    rules = layout["rules"]
    specs = rule_specs(path=[str(rules)])
    assert [(s.namespace, s.path) for s in specs] == [
        ("a.yar", str(rules / "a.yar")),
        ("sub/b.yara", str(rules / "sub" / "b.yara")),
    ]
    one = rule_specs(path=str(rules / "a.yar"))
    assert [(s.namespace, s.path) for s in one] == [(DEFAULT_NAMESPACE, str(rules / "a.yar"))]
    named = rule_specs(path=[f"mine:{rules / 'a.yar'}", str(rules / "sub" / "b.yara")])
    assert [s.namespace for s in named] == ["mine", str(rules / "sub" / "b.yara")]
    assert [
        s.namespace
        for s in rule_specs(rule={"x": "rule a { condition: true }", "y": "rule a { condition: true }"})
    ] == ["x", "y"]
    with pytest.raises(RuleError, match="given twice"):
        rule_specs(path=[f"n:{rules / 'a.yar'}", f"n:{rules / 'sub' / 'b.yara'}"])
    (layout["tmp"] / "empty").mkdir()
    with pytest.raises(RuleError, match=r"no \.yar or \.yara files"):
        rule_specs(path=[str(layout["tmp"] / "empty")])
    with pytest.raises(RuleError, match="not found"):
        rule_specs(path=[str(rules / "missing.yar")])


@pytest.mark.parametrize("engine", ["yara", "yara-x"])
def test_search_and_verify_keep_each_file_in_its_namespace(layout, engine) -> None:
    truth = yara_truth(layout["rules"], layout["samples"])
    with sspry.Database.open(layout["db"]) as db:
        result = db.search(path=[str(layout["rules"])], verify=True, engine=engine)
    found = by_name(result)
    assert list(found) == [
        "a.yar:small",
        "a.yar:r",
        "a.yar:wide_only",
        "sub/b.yara:r",
        "sub/b.yara:other",
    ]
    short, long = (hashlib.sha256((layout["samples"] / n).read_bytes()).digest() for n in ("short", "long"))
    # the global rule of a.yar restricts a.yar's rules only, and the planner knows it (filesize is exact)
    assert found["a.yar:r"] == {short}
    assert found["sub/b.yara:r"] == {short, long}
    assert truth["a.yar:r"] == {short} and truth["sub/b.yara:r"] == {short, long}
    for rule in result.rules:
        assert truth.get(rule.name, set()) <= found[rule.name], rule.name  # nothing missed
        verified = {c.source_id for c in rule.candidates if c.verified}
        assert verified == truth.get(rule.name, set()), (rule.name, engine)


def test_a_server_answers_namespaces_as_a_database_does(layout) -> None:
    with sspry.Database.open(layout["db"]) as db:
        local = db.search(path=[str(layout["rules"])], verify=True)
    server = ServerProcess(layout["db"])
    try:
        with sspry.connect(server.addr) as servers:
            remote = servers.search(path=[str(layout["rules"])], verify=True)
            single = servers.search(path=str(layout["rules"] / "a.yar"))
    finally:
        assert server.stop() == 0
    assert by_name(local) == by_name(remote)
    assert [[c.verified for c in r.candidates] for r in local.rules] == [
        [c.verified for c in r.candidates] for r in remote.rules
    ]
    assert [r.name for r in single.rules] == ["small", "r", "wide_only"]  # one file: plain names


def test_rule_text_by_namespace(layout) -> None:
    text = {"first": SMALL_ONLY, "second": ANY_SIZE}
    with sspry.Database.open(layout["db"]) as db:
        from_text = db.search(rule=text)
        from_files = db.search(
            path=[f"first:{layout['rules'] / 'a.yar'}", f"second:{layout['rules'] / 'sub/b.yara'}"]
        )
    assert by_name(from_text) == by_name(from_files)
    assert list(by_name(from_text)) == [
        "first:small",
        "first:r",
        "first:wide_only",
        "second:r",
        "second:other",
    ]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_the_command_line_takes_several_rule_files_and_directories(layout) -> None:
    rules = layout["rules"]
    code, out = run(
        "local",
        "search",
        "--root",
        str(layout["db"]),
        "--rule",
        str(rules / "a.yar"),
        "--rule",
        str(rules / "sub"),
        "--count",
        "--json",
    )
    assert code == 0, out
    counts = {r["rule"]: r["candidate_count"] for r in json.loads(out)["rules"]}
    assert counts == {
        f"{rules / 'a.yar'}:small": 1,
        f"{rules / 'a.yar'}:r": 1,
        f"{rules / 'a.yar'}:wide_only": 0,
        "b.yara:r": 2,
        "b.yara:other": 2,
    }

    code, out = run("rule-check", "--rule", str(rules), "--json")
    assert code == 0, out
    assert [r["rule"] for r in json.loads(out)["rules"]] == [
        "a.yar:small",
        "a.yar:r",
        "a.yar:wide_only",
        "sub/b.yara:r",
        "sub/b.yara:other",
    ]

    for engine in ("yara", "yara-x"):
        code, out = run("--rule", str(rules), "--engine", engine, "--json", str(layout["samples"] / "long"))
        assert code == 0, out
        assert [m["rule"] for m in json.loads(out)["matches"]] == ["sub/b.yara:r", "sub/b.yara:other"]

    code, out = run("local", "search", "--root", str(layout["db"]), "--rule", str(layout["tmp"] / "nope.yar"))
    assert code == 2 and "nope.yar: rule file not found" in out


def test_a_namespace_yaramod_cannot_parse_is_still_compiled_for_verification() -> None:
    """A rule text yaramod refused has no inlined text: the whole set is compiled from the text as given."""
    from sspry.query.rules import Namespace, RuleSource

    given = 'rule r { strings: $a = "needle" condition: $a }'
    refused = Namespace("b", "<rule text b>", None, ("r",), "yaramod refused it", given=given)
    plain = Namespace("a", "<rule text a>", "rule s { condition: true }", ("s",))
    compiled = RuleSource((plain, refused)).compiled
    assert sorted((m.namespace, m.rule) for m in compiled.match(data=b"a needle")) == [("a", "s"), ("b", "r")]
