"""The bench scripts against a real server: they run end to end and their tables add up."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sspry import synthetic

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.access("/usr/bin/time", os.X_OK), reason="needs /usr/bin/time")


def _free_addr() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIN": str(Path(sys.executable).parent / "sspry")}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_index_then_search_bench(tmp_path) -> None:
    corpus = synthetic.generate(tmp_path / "files", 40, seed=5, tokens=3)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "all.yar").write_text(synthetic.rules_for(corpus.tokens))
    (rules / "one.yar").write_text(f'rule one {{ strings: $a = "{corpus.tokens[0]}" condition: $a }}\n')
    (tmp_path / "rule-list").write_text(f"{rules / 'one.yar'}\n# a comment\n{rules / 'all.yar'}\n")
    root, addr = tmp_path / "forest", _free_addr()

    done = _run(
        "index_bench.sh",
        "--root",
        str(root),
        "--addr",
        addr,
        "--out",
        str(tmp_path / "idx"),
        "--init",
        "--sample-interval",
        "0.2",
        str(corpus.directory),
    )
    assert done.returncode == 0, done.stderr
    (row,) = _table(tmp_path / "idx" / "index_summary.tsv")
    assert int(row["files"]) == len(corpus.files)
    assert int(row["input_bytes"]) == sum(p.stat().st_size for p in corpus.files)
    assert float(row["mb_per_s"]) > 0 and int(row["db_bytes_after"]) > int(row["db_bytes_before"])
    assert int(row["server_max_vmrss_kb"]) > 0
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["submitted_documents"] == len(
        corpus.files
    )

    done = _run(
        "server_search_bench.sh",
        "--root",
        str(root),
        "--addr",
        addr,
        "--out",
        str(tmp_path / "s"),
        "--rule-list",
        str(tmp_path / "rule-list"),
        "--bundle-rule",
        str(rules / "all.yar"),
        "--sample-interval",
        "0.2",
        "--mode-label",
        "smoke",
    )
    assert done.returncode == 0, done.stderr
    individual = _table(tmp_path / "s" / "individual_summary.tsv")
    assert [r["rule_file"] for r in individual] == [str(rules / "one.yar"), str(rules / "all.yar")]
    assert all(r["exit"] == "0" and float(r["elapsed_s"]) > 0 for r in individual)
    bundle = json.loads((tmp_path / "s" / "searches" / "bundle.json").read_text())
    assert int(individual[1]["candidates"]) == sum(r["candidate_count"] for r in bundle["rules"]) > 0
    phases = _table(tmp_path / "s" / "phase_summary.tsv")
    assert [(p["mode_label"], p["phase"]) for p in phases] == [("smoke", "individual"), ("smoke", "bundle")]
    assert all(int(p["sample_count"]) >= 2 and int(p["server_max_vmrss_kb"]) > 0 for p in phases)
    samples = _table(tmp_path / "s" / "server_samples.tsv")
    assert {"individual", "bundle"} <= {s["phase"] for s in samples}
    # the server was shut down: nothing answers on the address any more
    with pytest.raises(OSError), socket.create_connection(tuple(addr.rsplit(":", 1)), timeout=1):
        pass


def test_startup_bench() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "startup_bench.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[1:]
    assert [row[:36].strip() for row in rows] == [
        "sspry --help",
        "sspry local search (3 files)",
        "sspry search --addr (warm server)",
    ]
    assert all(0 < float(value) < 60 for row in rows for value in row[36:].split())


def test_search_bench_times_evaluation_and_writes_candidates(tmp_path) -> None:
    from sspry.indexing import index_paths
    from sspry.policy import Policy
    from sspry.store.forest import Forest

    corpus = synthetic.generate(tmp_path / "files", 30, seed=4, tokens=3)
    singles = tmp_path / "singles"
    singles.mkdir()
    for i, token in enumerate(corpus.tokens):
        (singles / f"r{i}.yar").write_text(f'rule r{i} {{ strings: $a = "{token}" condition: $a }}\n')
    bundle = tmp_path / "all.yar"
    bundle.write_text(synthetic.rules_for(corpus.tokens))
    Forest.init(tmp_path / "forest", Policy())
    with Forest.open(tmp_path / "forest", writable=True) as forest:
        index_paths(forest, [str(tmp_path / "files")])
    out = tmp_path / "out.json"
    args = [str(tmp_path / "forest"), "--singles", str(singles), "--bundle", str(bundle), "--reps", "2"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "search_bench.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["report"]["documents"] == 30 and report["report"]["single_ms"]["rules"] == 3
    assert len(report["report"]["bundle all.yar"]["runs_s"]) == 2
    planted = {f"r{i}.yar:r{i}" for i in range(3)}
    assert planted <= set(report["candidates"]) and any(report["candidates"][k] for k in planted)


def test_recall_audit_with_externals_several_sources_and_both_engines(tmp_path) -> None:
    """The audit finds the truth with yara-python and yara-x, across rule directories, with externals;
    a planted false negative (a document deleted from the forest) makes it fail."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.bin").write_bytes(b"xx hello-world yy")
    (files / "b.bin").write_bytes(b"nothing to see")
    for name, text in (
        ("one", 'rule greet { strings: $h = "hello-world" condition: $h }\n'),
        ("two", 'rule gated { strings: $h = "hello-world" condition: $h and flag == 1 }\n'),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "r.yar").write_text(text)
    audit = [
        sys.executable,
        str(ROOT / "scripts" / "recall_audit.py"),
        "--corpus",
        str(files),
        "--rules",
        str(tmp_path / "one"),
        str(tmp_path / "two"),
        "-d",
        "flag=1",
        "--engine",
        "both",
        "--root",
        str(tmp_path / "db"),
        "--json",
        str(tmp_path / "audit.json"),
    ]
    done = subprocess.run(audit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "audit.json").read_text())["summary"]
    assert report["rules"] == 2 and report["true_match_pairs"] == 2 and report["false_negatives"] == 0
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sspry",
            "local",
            "delete",
            "--root",
            str(tmp_path / "db"),
            str(files / "a.bin"),
        ],
        check=True,
        capture_output=True,
    )
    assert subprocess.run(audit, capture_output=True, text=True, timeout=300).returncode == 1


def test_ruleset_bench_times_each_set_and_its_limit(tmp_path) -> None:
    """A whole directory and one folder as sets, through a real server: every timing comes with its
    ratio to the brute force, and the limit scans each matching content once."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(12):
        (files / f"f{i}.txt").write_text(f"file {i} holds token-{i % 3}- and more text to scan")
    (files / "copy.txt").write_text("file 0 holds token-0- and more text to scan")  # f0's content again
    rules = tmp_path / "rules" / "folder"
    rules.mkdir(parents=True)
    (rules / "a.yar").write_text('rule zero { strings: $a = "token-0-" condition: $a }')
    (rules / "b.yar").write_text('rule one { strings: $a = "token-1-" condition: $a }')
    out = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "ruleset_bench.py"),
            "--corpus",
            str(files),
            "--rules",
            str(tmp_path / "rules"),
            "--work",
            str(tmp_path / "work"),
            "--brute",
            "fast",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["set"]: row for row in json.loads(out.read_text())["sets"]}
    assert set(rows) == {"all", "folder"}
    for row in rows.values():
        assert row["rules"] == 2 and row["documents"] == 12  # copy.txt is f0's document
        # f0, f3, f6, f9 (and copy.txt, the same content) hold token-0-; f1, f4, f7, f10 token-1-
        assert row["matching_documents"] == 8 and row["candidate_pairs"] >= 8
        for label in ("first", "repeated", "verify"):
            assert row[f"{label}_s"] > 0 and row[f"{label}_ratio"] == round(
                row["yara_fast_s"] / row[f"{label}_s"], 2
            )
        assert row["limit_s"] >= row["repeated_s"] and row["limit_ratio"] > 0


def test_gram_bound_counts_what_a_perfect_gram_index_would_return(tmp_path) -> None:
    """A file holding every gram of a string but not the string is a candidate of any gram index and
    does not match; a rule that also needs a file property is only 'at most' from grams alone."""
    import sspry

    files = tmp_path / "files"
    files.mkdir()
    (files / "match.bin").write_bytes(b"header zebra-quokka trailer")
    (files / "split.bin").write_bytes(b"zebra-quo|ra-quokka")  # every 3- and 4-gram, not the string
    (files / "sized.bin").write_bytes(b"a walrus-narwhal here")
    (files / "none.bin").write_bytes(b"nothing of interest in this one")
    rules = tmp_path / "rules.yar"
    rules.write_text(
        'rule plain { strings: $a = "zebra-quokka" condition: $a }\n'
        'rule sized { strings: $b = "walrus-narwhal" condition: $b and filesize < 1000 }\n'
    )
    with sspry.Database.create(tmp_path / "forest", store_path=True) as db:
        db.index([str(files)])
    out = tmp_path / "bound.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gram_bound.py"),
            *("--root", str(tmp_path / "forest"), "--rules", str(rules)),
            *("--processes", "1", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["rules"] == 2 and report["documents"] == 4
    assert report["exact_grams_at_least"]["files"] == 2  # match.bin and split.bin
    assert report["exact_grams_at_most"]["files"] == 3  # and sized.bin: its file size is not a gram
    assert report["matching"]["files"] == 2  # match.bin and sized.bin
    assert report["candidates"]["files"] >= 3
    sizes = {p.name: p.stat().st_size for p in files.iterdir()}
    assert report["exact_grams_at_least"]["bytes"] == sizes["match.bin"] + sizes["split.bin"]


def test_gram_bound_finds_grams_across_chunks(tmp_path) -> None:
    """Grams are found whole-file and in 5-byte chunks alike; Tier 1 also lowercased, Tier 2 not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gram_bound

    wanted = [b"\x01abc", b"\x01xyz", b"\x01qrs", b"\x02bcde", b"\x02QRST", b"\x02none"]
    tiers = [gram_bound.Tier.of(1, 3, True, wanted), gram_bound.Tier.of(2, 4, False, wanted)]
    path = tmp_path / "probe.bin"
    path.write_bytes(b"..aBcde..QRST..XyZ.." * 3)
    whole = gram_bound.grams_in(str(path), tiers)
    assert whole == {b"\x01abc", b"\x01xyz", b"\x01qrs", b"\x02QRST"}  # Bcde is not bcde in Tier 2
    for chunk in (1, 2, 5, 7):
        assert gram_bound.grams_in(str(path), tiers, chunk=chunk) == whole
