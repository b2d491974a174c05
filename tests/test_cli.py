"""The `sspry` command end to end: init, local index/search/delete/compact/info, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sspry import indexing
from sspry.cli import main
from sspry.features import walk
from sspry.policy import Policy
from sspry.store.forest import Forest
from tests.conftest import settle


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


@pytest.fixture
def files(tmp_path) -> Path:
    directory = tmp_path / "files"
    (directory / "sub").mkdir(parents=True)
    (directory / "a.txt").write_bytes(b"prefix needle-alpha suffix " * 10)
    (directory / "b.txt").write_bytes("wide needle-beta".encode("utf-16-le"))
    (directory / "sub" / "c.bin").write_bytes(bytes(range(256)) * 40)
    (directory / "sub" / "empty").write_bytes(b"")
    (directory / "sub" / "dup.txt").write_bytes(b"prefix needle-alpha suffix " * 10)  # same content as a.txt
    return settle(directory)


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.yar"
    path.write_text(
        'rule alpha { strings: $a = "needle-alpha" condition: $a }\n'
        'rule beta { strings: $a = "needle-beta" wide condition: $a }\n'
        "rule big { condition: filesize > 5KB }\n"
    )
    return path


def test_init_rejects_invalid_values(tmp_path) -> None:
    root = str(tmp_path / "f")
    for bad in (
        ["--gram-sizes", "3,5"],
        ["--gram-sizes", "x"],
        ["--tier1-set-fp", "0.9"],
        ["--tier2-set-fp", "0.001"],
        ["--id-source", "crc32"],
        ["--shards", "0"],
    ):
        result = run("init", "--root", root, *bad, code=2)
        assert "Invalid value" in result.output
        assert not (tmp_path / "f").exists()
    result = run("init", "--root", root, "--gram-sizes", "4,5", "--id-source", "md5")
    assert "gram_sizes: 4,5" in result.output and "id_source: md5" in result.output
    result = run("init", "--root", root, code=2)
    assert "different policy" in result.output
    run("init", "--root", root, "--force")


def test_local_index_search_delete_compact(tmp_path, files, rules) -> None:
    root = str(tmp_path / "forest")
    run("init", "--root", root, "--store-path", "--shards", "2")
    result = run("local", "index", "--root", root, str(files))
    assert "submitted_documents: 5" in result.output
    assert "processed_documents: 5" in result.output
    assert "inserted_documents: 4" in result.output  # dup.txt has a.txt's content
    assert "duplicate_documents: 1" in result.output
    assert "elapsed_s: " in result.output and "mb_per_s: " in result.output
    again = json.loads(run("local", "index", "--root", root, "--json", str(files)).stdout)
    assert again["inserted_documents"] == 0 and again["submitted_documents"] == 0  # nothing read again
    assert again["already_indexed_files"] == 5

    a_txt, dup_txt = str(files / "a.txt"), str(files / "sub" / "dup.txt")
    plain = run("local", "search", "--root", root, "--rule", str(rules)).stdout
    blocks = plain.strip().split("\n\n")
    assert blocks[0].splitlines()[:3] == ["rule: alpha", "candidates: 1", "truncated: false"]
    alpha_id = hashlib.sha256((files / "a.txt").read_bytes()).hexdigest()
    assert blocks[0].splitlines()[3].split("\t") == [alpha_id, a_txt, dup_txt]  # every path of the content

    data = json.loads(
        run("local", "search", "--root", root, "--rule", str(rules), "--json", "--verify").stdout
    )
    assert data["documents"] == 4
    timings = data["timings_ms"]
    assert set(timings) == {"compile", "plan", "search", "verify", "total"}
    assert data["elapsed_ms"] == timings["total"] >= timings["plan"] + timings["search"] + timings["verify"]
    by_rule = {r["rule"]: r for r in data["rules"]}
    alpha = by_rule["alpha"]["candidates"][0]
    assert (alpha["verified"], alpha["paths"], alpha["path_count"]) == (True, [a_txt, dup_txt], 2)
    assert [c["verified"] for c in by_rule["beta"]["candidates"]] == [True]
    assert [c["paths"] for c in by_rule["big"]["candidates"]] == [[str(files / "sub" / "c.bin")]]

    capped = json.loads(
        run("local", "search", "--root", root, "--rule", str(rules), "--json", "--max-candidates", "1").stdout
    )
    # "big" has one candidate and the cap is ceil(4 * 1%) = 1: nothing to truncate
    assert not any(r["truncated"] for r in capped["rules"])
    broad = tmp_path / "broad.yar"
    broad.write_text("rule everything { condition: filesize >= 0 }\n")
    capped = json.loads(
        run(
            "local", "search", "--root", root, "--rule", str(broad), "--json", "--max-candidates", "25"
        ).stdout
    )
    rule = capped["rules"][0]
    assert (rule["candidate_count"], rule["truncated"], rule["truncated_limit"]) == (4, True, 1)
    assert len(rule["candidates"]) == 1

    # one path of a content two paths hold: that path goes, the document stays, found by the other
    deleted = json.loads(run("local", "delete", "--root", root, "--json", dup_txt).stdout)
    assert deleted == [
        {"value": dup_txt, "status": "path-removed", "identity": alpha_id, "remaining_paths": 1}
    ]
    data = json.loads(run("local", "search", "--root", root, "--rule", str(rules), "--json").stdout)
    assert data["rules"][0]["candidates"][0]["paths"] == [a_txt]
    deleted = run("local", "delete", "--root", root, str(files / "b.txt"), "ab" * 32, "abc", code=1).stdout
    lines = deleted.splitlines()
    assert lines[1] == "status: deleted" and lines[4] == "status: missing"
    assert lines[6] == "reason: no document with this Source ID"
    assert lines[10] == (
        "reason: not a sha256 Source ID (64 hex digits, this is 3), and no file or recorded path of that name"
    )
    run("local", "delete", "--root", root, a_txt)  # its last path: the document goes
    info = json.loads(run("local", "info", "--root", root).stdout)
    assert (info["documents"], info["deleted"], info["files"]) == (2, 2, 2)
    compacted = run("local", "compact", "--root", root, "--json")
    assert json.loads(compacted.stdout)["purged_documents"] == 2
    info = json.loads(run("local", "info", "--root", root).stdout)
    assert (info["documents"], info["deleted"]) == (2, 0) and info["segments"] <= 2  # one per shard at most
    assert info["policy"]["store_path"] is True and info["disk_bytes"] > 0
    # deleted files are read again by the next run: they are no longer indexed
    again = json.loads(run("local", "index", "--root", root, "--json", str(files)).stdout)
    assert (again["inserted_documents"], again["already_indexed_files"]) == (2, 2)


def test_uninitialised_root_is_a_clear_error(tmp_path, rules) -> None:
    root = str(tmp_path / "nothing")
    for args in (
        ["local", "index", "--root", root, str(rules)],
        ["local", "search", "--root", root, "--rule", str(rules)],
        ["local", "info", "--root", root],
        ["local", "delete", "--root", root, "00"],
        ["local", "compact", "--root", root],
    ):
        result = run(*args, code=2)
        assert "sspry init --root" in result.output


def test_bad_rule_files(tmp_path, files) -> None:
    root = str(tmp_path / "forest")
    run("init", "--root", root)
    run("local", "index", "--root", root, str(files))
    empty = tmp_path / "empty.yar"
    empty.write_bytes(b"")
    assert "no rules" in run("local", "search", "--root", root, "--rule", str(empty), code=2).output
    binary = tmp_path / "binary.yar"
    binary.write_bytes(bytes(range(256)) * 4)
    result = run("local", "search", "--root", root, "--rule", str(binary), code=2)
    assert f"{binary}(1)" in result.output
    broken = tmp_path / "broken.yar"
    broken.write_text("rule ok { condition: true }\n\nrule bad {\n condition:\n  $missing\n}\n")
    result = run("local", "search", "--root", root, "--rule", str(broken), code=2)
    assert f"{broken}(6)" in result.output and "$missing" in result.output
    result = run("local", "search", "--root", root, "--rule", str(tmp_path / "nope.yar"), code=2)
    assert "not found" in result.output or "does not exist" in result.output
    result = run("local", "search", "--root", root, "--rule", str(files / "a.txt"), "--verify", code=2)
    assert "--store-path" in result.output


def test_vanished_file_is_reported_and_the_rest_indexed(tmp_path, files, monkeypatch) -> None:
    Forest.init(tmp_path / "forest", Policy())
    real_walk = walk.walk

    def walk_then_delete(paths, path_list=False):
        found = real_walk(paths, path_list)
        os.unlink(files / "b.txt")  # vanishes between the walk and its extraction
        return found

    monkeypatch.setattr(walk, "walk", walk_then_delete)  # index_paths imports it when called
    with Forest.open(tmp_path / "forest", writable=True) as forest:
        summary = indexing.index_paths(forest, [str(files)])
        assert summary.skipped_files == 1
        assert "b.txt" in summary.problems[0].path and "No such file" in summary.problems[0].reason
        assert summary.inserted_documents == 3
        assert forest.snapshot().documents == 3


def test_missing_paths_are_reported(tmp_path, files) -> None:
    root = str(tmp_path / "forest")
    run("init", "--root", root)
    result = run("local", "index", "--root", root, str(files), str(tmp_path / "missing"))
    assert "skipped_files: 1" in result.output
    assert "no such file or directory" in result.stderr
    result = run("local", "index", "--root", root, str(tmp_path / "missing"), code=2)
    assert "no files could be indexed" in result.output


def test_directory_without_permission(tmp_path) -> None:
    """The unreadable directory is reported and skipped, the readable files are indexed. Root reads
    everything, so as root the command runs without the capabilities that bypass file permissions."""
    data = tmp_path / "data"
    (data / "open").mkdir(parents=True)
    (data / "locked").mkdir()
    (data / "open" / "file.txt").write_bytes(b"readable content here")
    (data / "locked" / "secret.txt").write_bytes(b"hidden content")
    Forest.init(tmp_path / "forest", Policy())
    command = [
        sys.executable,
        "-m",
        "sspry.cli",
        "local",
        "index",
        "--root",
        str(tmp_path / "forest"),
        str(data),
    ]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *command]
    (data / "locked").chmod(0)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        (data / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "inserted_documents: 1" in result.stdout
    assert "skipped_files: 1" in result.stdout
    assert "locked" in result.stderr and "Permission denied" in result.stderr


def test_verify_reports_changed_and_missing_files(tmp_path, files, rules) -> None:
    root = str(tmp_path / "forest")
    run("init", "--root", root, "--store-path")
    run("local", "index", "--root", root, str(files))
    (files / "b.txt").write_bytes("wide needle-beta changed".encode("utf-16-le"))
    os.unlink(files / "sub" / "c.bin")
    data = json.loads(
        run("local", "search", "--root", root, "--rule", str(rules), "--json", "--verify").stdout
    )
    by_rule = {r["rule"]: r["candidates"] for r in data["rules"]}
    assert [(c["verified"], c["skipped"]) for c in by_rule["beta"]] == [(None, "changed")]
    assert [(c["verified"], c["skipped"]) for c in by_rule["big"]] == [(None, "missing")]
    assert "no longer exists" in by_rule["big"][0]["skip_detail"]
    result = run("local", "search", "--root", root, "--rule", str(rules), "--verify")
    beta = result.stdout.split("\n\n")[1].splitlines()
    assert "verified_skipped: 1" in beta
    assert beta[-1].split("\t")[1:] == ["skipped:changed", str(files / "b.txt")]
    assert "changed since it was indexed" in result.stderr
    # a.txt gone but dup.txt holds the same content: verified from the path that still holds it
    os.unlink(files / "a.txt")
    alpha = json.loads(
        run("local", "search", "--root", root, "--rule", str(rules), "--json", "--verify").stdout
    )["rules"][0]["candidates"]
    assert [c["verified"] for c in alpha] == [True]


def test_rule_check(tmp_path) -> None:
    rules = tmp_path / "check.yar"
    rules.write_text(
        'import "pe"\n'
        'rule exact { strings: $a = "needle-alpha" condition: $a and filesize < 1MB }\n'
        'rule partly { strings: $a = "needle-alpha" condition: $a and pe.sections[0].name == ".text" }\n'
        'rule nothing { strings: $a = "ab" condition: $a }\n'
        "private rule helper { condition: true }\n"
    )
    data = json.loads(run("rule-check", "--rule", str(rules), "--json").stdout)
    by_rule = {r["rule"]: r for r in data["rules"]}
    assert data["status"] == "unsearchable"  # the worst public rule
    assert data["policy"] == {"source": "defaults", "id_source": "sha256", "gram_sizes": [3, 4]}
    assert by_rule["exact"]["status"] == "searchable" and not by_rule["exact"]["notes"]
    assert "6e6565" in by_rule["exact"]["strings"][0]["grams"]["tier1"]  # "nee"
    assert by_rule["partly"]["status"] == "searchable-needs-verify"
    note = by_rule["partly"]["notes"][0]
    assert (note["code"], note["line"]) == ("module-array", 3)
    assert note["hint"] and note["message"] and note["text"] == 'pe.sections[0].name == ".text"'
    assert by_rule["partly"]["strings"][0]["text"] == '"needle-alpha"'
    assert by_rule["nothing"]["status"] == "unsearchable"
    assert by_rule["nothing"]["notes"][0]["code"] == "string-unanchored"
    assert by_rule["helper"]["private"] is True
    assert data["counts"] == {"searchable": 1, "searchable-needs-verify": 1, "unsearchable": 2}  # helper too
    text = run("rule-check", "--rule", str(rules), "--gram-sizes", "4,5").stdout
    assert "policy_source: explicit" in text and "gram_sizes: 4,5" in text and "rule: partly" in text
    assert "rules: 4 (1 searchable, 1 searchable-needs-verify, 2 unsearchable)" in text
    assert text.count("every part of the condition narrows the search") == 1  # said once, not per rule
    only = run("rule-check", "--rule", str(rules), "--only-problems").stdout
    assert "rule: partly" in only and "rule: nothing" in only and "rule: exact" not in only
    # gating for CI: exit 1 when a public rule has the status (or a worse one)
    run("rule-check", "--rule", str(rules), "--fail-on", "unsearchable", code=1)
    good = tmp_path / "good.yar"
    good.write_text('rule ok { strings: $a = "needle-alpha" condition: $a }\n')
    run("rule-check", "--rule", str(good), "--fail-on", "searchable-needs-verify")
    broken = tmp_path / "broken.yar"
    broken.write_text("rule x { condition: $nope }\n")
    assert f"{broken}(1)" in run("rule-check", "--rule", str(broken), code=2).output


def test_rule_check_findings(tmp_path) -> None:
    """What the planner used to misreport: module functions and arrays named as such, a leading-zero
    literal read as YARA reads it, count comparisons planned from the strings they need."""
    rules = tmp_path / "findings.yar"
    rules.write_text(
        'import "pe"\n'
        'rule imphash { condition: pe.imphash() == "f34d5f2d4577ed6d9ceec516c1f5a744" }\n'
        'rule octal { strings: $tag = "needle-tag" condition: $tag in (0..0100) }\n'
        'rule counts { strings: $s1 = "needle-one" $sn1 = "needle-two" condition: #s1 > #sn1 + 2 }\n'
        'rule loop { strings: $a = "needle-one" $b = "needle-two" '
        'condition: for any of ($a, $b) : (pe.sections[0].name == ".text" and $) }\n'
    )
    data = json.loads(run("rule-check", "--rule", str(rules), "--json").stdout)
    by_rule = {r["rule"]: r for r in data["rules"]}
    assert [n["code"] for n in by_rule["imphash"]["notes"]] == ["module-function"]
    assert by_rule["octal"]["status"] == "searchable" and not by_rule["octal"]["notes"]
    assert by_rule["counts"]["status"] == "searchable" and not by_rule["counts"]["notes"]
    assert [n["code"] for n in by_rule["loop"]["notes"]] == ["module-array"]  # once, not once per string


def test_rule_check_codes_are_documented() -> None:
    """docs/usage.md lists exactly the codes rule-check prints, with the same meaning and hint."""
    from sspry.query.ruleplan import CODES, HINTS

    usage = (Path(__file__).parent.parent / "docs" / "usage.md").read_text()
    usage = usage[usage.index("The codes (the same in the output") :].split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| (.+) \| (.+) \|$", usage, re.M)
    assert {code: (meaning, hint) for code, meaning, hint in rows} == {
        code: (CODES[code], HINTS[code]) for code in CODES
    }


def test_searches_load_no_compiled_kernels(tmp_path, files, rules) -> None:
    """`sspry search`/`info`/`delete` and a `local search` of a small forest start fast: the client side
    of a search (rule loading, the cluster, verification) and a small local search (numpy gathers its
    leaves, see query/gather.py) import neither numba nor datasketch (scipy), which cost up to a second;
    the client side not even numpy or tqdm."""
    root = str(tmp_path / "forest")
    run("init", "--root", root)
    run("local", "index", "--root", root, str(files))
    remote = (
        "import sys, sspry.cli, sspry.verify\n"
        "from sspry.client.cluster import Cluster\n"
        "from sspry.query.rules import load_rules\n"
    )
    local = (
        "import sys\n"
        "from sspry.cli import main\n"
        f"main(['local', 'search', '--root', {root!r}, '--rule', {str(rules)!r}], standalone_mode=False)\n"
    )
    heavy = ("numba", "datasketch", "scipy")
    for code, unwanted in ((remote, (*heavy, "numpy", "tqdm")), (local, heavy)):
        check = f"print(sorted(m for m in {unwanted!r} if m in sys.modules))\n"
        out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert "rule: alpha\ncandidates: 1\n" in out.stdout  # the local search did run


def test_unknown_command_is_an_error_with_a_suggestion(tmp_path, rules) -> None:
    result = run("serach", "--rule", str(rules), code=2)
    assert "No such command 'serach'" in result.output and "search" in result.output


def test_scan_mode_walks_directories_skips_fifos_and_prints_json(tmp_path, files, rules) -> None:
    os.mkfifo(files / "sub" / "pipe")  # a reader would block on it forever
    plain = run("--rule", str(rules), str(files)).stdout
    assert plain.count("file: ") == 5 and "pipe" not in plain
    lines = [json.loads(line) for line in run("--rule", str(rules), "--json", str(files)).stdout.splitlines()]
    matched = {Path(row["file"]).name: [m["rule"] for m in row["matches"]] for row in lines}
    assert matched == {
        "a.txt": ["alpha"],
        "b.txt": ["beta"],
        "c.bin": ["big"],
        "dup.txt": ["alpha"],
        "empty": [],
    }
    result = run("--rule", str(rules), str(files / "sub" / "pipe"), code=1)  # named: reported, not read
    assert "not a regular file" in result.stderr


def test_every_option_has_help_and_shows_its_default() -> None:
    import click

    def options(command, name, parent=None):
        ctx = click.Context(command, info_name=name, parent=parent)
        if isinstance(command, click.Group):
            for sub, child in command.commands.items():
                yield from options(child, sub, ctx)
        for param in command.params:
            if isinstance(param, click.Option):
                yield ctx, param

    checked = 0
    for ctx, option in options(main, "sspry"):
        checked += 1
        where = f"{ctx.command_path} {option.opts[0]}"
        assert option.help, f"{where} has no help"
        _, text = option.get_help_record(ctx)
        default = option.get_default(ctx)
        if not option.is_flag and isinstance(default, int | float | str):
            assert "default" in text, f"{where} hides its default {default!r}"
    assert checked > 40
    text = run("--help").stdout
    assert all(word in text for word in ("SSPRY_ROOT", "SSPRY_ADDR", "SSPRY_TOKEN", "_SSPRY_COMPLETE"))


def test_output_formats_stream_rule_by_rule(tmp_path, files, rules) -> None:
    root = str(tmp_path / "forest")
    run("init", "--root", root, "--store-path")
    run("local", "index", "--root", root, str(files))
    whole = json.loads(run("local", "search", "--root", root, "--rule", str(rules), "--json").stdout)
    lines = [
        json.loads(line)
        for line in run(
            "local", "search", "--root", root, "--rule", str(rules), "--ndjson"
        ).stdout.splitlines()
    ]
    assert [line["rule"] for line in lines[:-1]] == ["alpha", "beta", "big"]
    assert lines[:-1] == whole["rules"] and lines[-1]["summary"]["documents"] == whole["documents"] == 4
    counted = json.loads(
        run("local", "search", "--root", root, "--rule", str(rules), "--json", "--count").stdout
    )
    assert [(r["candidate_count"], "candidates" in r) for r in counted["rules"]] == [
        (r["candidate_count"], False) for r in whole["rules"]
    ]
    broad = tmp_path / "broad.yar"
    broad.write_text("rule everything { condition: filesize >= 0 }\n")
    limited = json.loads(
        run("local", "search", "--root", root, "--rule", str(broad), "--json", "--limit", "2").stdout
    )["rules"][0]
    assert (limited["candidate_count"], len(limited["candidates"]), limited["truncated_limit"]) == (4, 2, 2)
    assert (
        "--count"
        in run("local", "search", "--root", root, "--rule", str(rules), "--count", "--verify", code=2).output
    )


def test_yaras_match_limit_warning_does_not_bury_the_output(tmp_path) -> None:
    """yara-python warns when a string passes YARA's match limit; the verdict is YARA's, the warning noise."""
    rule = tmp_path / "zeros.yar"
    rule.write_text("rule zeros { strings: $z = { 00 } condition: $z }\n")
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(1_100_000))  # more matches of $z than YARA keeps
    done = subprocess.run(
        [sys.executable, "-m", "sspry", "--rule", str(rule), str(zeros)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "match_rule: zeros" in done.stdout
    assert done.stderr == ""
