"""`sspry web`: the REST API against a real web server process on loopback, over a real Forest of real
files and, in one test, over a real `sspry serve`."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_server import make_cert
from tests.webserver import PLANTED, build_forest, start_web

C2 = 'rule c2 {\n  strings:\n    $a = "evil-c2.example"\n  condition:\n    $a\n}\n'
ELF = "rule elf { strings: $e = { 7F 45 4C 46 } condition: $e at 0 }\n"
NEVER = 'rule never { strings: $a = "no-such-string-anywhere-8c1d2e" condition: $a }\n'
PLANTED_ID = hashlib.sha256(PLANTED).hexdigest()


@pytest.fixture(scope="module")
def forest(tmp_path_factory) -> tuple[Path, Path]:
    return build_forest(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def web(forest, tmp_path_factory):
    root, _ = forest
    server = start_web("--root", str(root), "--allow-download", state_dir=tmp_path_factory.mktemp("state"))
    yield server
    server.stop()


def test_search_verify_pages_and_exports(web, forest) -> None:
    _, corpus = forest
    job_id = web.search(C2 + ELF + NEVER, verify=True)
    job = web.wait(job_id)
    assert job["status"] == "done", job
    assert job["title"] == "c2 (+2 more)"
    assert job["rule_total"] == job["rules_done"] == 3
    assert job["first_result_ms"] is not None and job["elapsed_ms"] > 0
    assert job["rule"] is None  # a bundle's text is not sent with every poll
    assert web.get(f"/api/searches/{job_id}?include_rule=true")[1]["rule"] == C2 + ELF + NEVER
    _, paged, _ = web.get(f"/api/searches/{job_id}?rules_limit=1&rules_offset=1&only_hits=true")
    assert [r["rule"] for r in paged["rules"]] == ["elf"] and paged["rules_matching"] == 2
    _, named, _ = web.get(f"/api/searches/{job_id}?rule_name=EV")
    assert [r["rule"] for r in named["rules"]] == ["never"] and named["rules_matching"] == 1
    counts = {r["rule"]: r for r in job["rules"]}
    assert counts["c2"]["candidate_count"] == 1 and counts["c2"]["verified_count"] == 1
    assert counts["never"]["candidate_count"] == 0 and counts["never"]["verified_count"] == 0
    elves = counts["elf"]["candidate_count"]
    assert elves >= 10 and counts["elf"]["verified_count"] == elves  # every copied executable is ELF
    assert {s["stage"] for s in job["progress"]["stages"]} >= {"planning", "verifying"}

    status, page, _ = web.get(f"/api/searches/{job_id}/candidates?rule=c2")
    assert status == 200 and page["total"] == 1
    (found,) = page["candidates"]
    assert found["source_id"] == PLANTED_ID and found["verified"] is True
    assert sorted(found["paths"]) == sorted(str(corpus / n) for n in ("copy-of-dropper.bin", "dropper.bin"))
    assert [(m["identifier"], m["data"]) for m in found["matches"]] == [("$a", "evil-c2.example")] * 3

    # paging: the pages of the elf rule are its candidates, each once, in order
    _, everything, _ = web.get(f"/api/searches/{job_id}/candidates?rule=elf&limit=1000")
    seen = []
    for offset in range(0, elves, 4):
        _, page, _ = web.get(f"/api/searches/{job_id}/candidates?rule=elf&offset={offset}&limit=4")
        assert page["total"] == elves
        seen += [c["source_id"] for c in page["candidates"]]
    assert seen == [c["source_id"] for c in everything["candidates"]] and len(set(seen)) == elves
    _, all_rules, _ = web.get(f"/api/searches/{job_id}/candidates?limit=1000")
    assert all_rules["total"] == elves + 1
    _, verified, _ = web.get(f"/api/searches/{job_id}/candidates?verified=false")
    assert verified["total"] == 0

    status, raw, headers = web.get(f"/api/searches/{job_id}/export?format=csv")
    assert status == 200 and "attachment" in headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    assert len(rows) == elves + 1
    c2 = next(r for r in rows if r["rule"] == "c2")
    assert c2["verified"] == "true" and c2["source_id"] == PLANTED_ID and "dropper.bin" in c2["paths"]
    status, exported, _ = web.get(f"/api/searches/{job_id}/export?format=json&rule=c2")
    assert status == 200 and [c["source_id"] for c in exported["candidates"]] == [PLANTED_ID]

    status, listing, _ = web.get("/api/searches")
    assert status == 200 and job_id in [j["id"] for j in listing["searches"]]


def test_search_without_verify_streams_unverified(web) -> None:
    job = web.wait(web.search(C2, limit=5))
    assert job["status"] == "done" and job["verified_total"] is None
    assert job["options"] == {
        "verify": False,
        "max_candidates": 0.0,
        "limit": 5,
        "externals": {},
        "engine": "yara",
    }
    _, page, _ = web.get(f"/api/searches/{job['id']}/candidates?rule=c2")
    assert [(c["source_id"], c["verified"], c["matches"]) for c in page["candidates"]] == [
        (PLANTED_ID, None, None)
    ]


def test_verify_with_yara_x(web) -> None:
    job = web.wait(web.search(C2 + ELF, verify=True, engine="yara-x"))
    assert job["status"] == "done" and job["summary"]["verification"]["engine"] == "yara-x", job
    assert {r["rule"]: r["verified_count"] for r in job["rules"]}["c2"] == 1
    _, page, _ = web.get(f"/api/searches/{job['id']}/candidates?rule=c2")
    assert [(m["identifier"], m["data"]) for m in page["candidates"][0]["matches"]] == [
        ("$a", "evil-c2.example")
    ] * 3
    assert web.post("/api/searches", {"rule": C2, "engine": "clamav"})[0] == 400


def test_rules_only_yara_x_compiles_are_accepted(web) -> None:
    """The library judges what yara-python refuses: a module only yara-x has is searchable."""
    text = 'import "lnk"\nrule shortcut { condition: lnk.is_lnk }\n' + C2
    job = web.wait(web.search(text))
    assert job["status"] == "done" and job["rule_total"] == 2, job
    status, report, _ = web.post("/api/rule-check", {"rule": text})
    assert status == 200 and {r["rule"] for r in report["rules"]} == {"shortcut", "c2"}
    status, body, _ = web.post("/api/searches", {"rule": 'import "lnk"\nrule bad { condition: lnk.nope }'})
    assert status == 400 and body["line"] == 2, body


def test_externals_reach_the_search(web) -> None:
    gated = 'rule gated { strings: $a = "evil-c2.example" condition: $a and flag == 1 }'
    on = web.wait(web.search(gated, externals={"flag": 1}))
    off = web.wait(web.search(gated, externals={"flag": 0}))
    assert (on["candidate_total"], off["candidate_total"]) == (1, 0)
    status, body, _ = web.post("/api/searches", {"rule": gated})
    assert status == 400 and "undefined identifier" in body["error"] and body["line"] == 1


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"rule": "rule broken {\n  condition:\n    nope\n}"}, 400, r"line 3: undefined identifier"),
        (
            {"rule": 'include "/etc/passwd"\nrule a { condition: true }'},
            400,
            r"line 1: includes are disabled: include directives are not accepted",
        ),
        ({"rule": "   "}, 400, r"empty"),
        ({"rule": "private rule p { condition: true }"}, 400, r"no public rule"),
        ({"rule": C2, "verify": "maybe"}, 400, r"^verify: "),
        ({"rule": C2, "limit": 0}, 400, r"^limit: "),
        ({"rule": C2, "max_candidates": 101}, 400, r"^max_candidates: "),
        ({"verify": True}, 400, r"^rule: Field required"),
        (b"{not json", 400, r"JSON"),
    ],
)
def test_bad_input_is_one_line_400(web, body, status, error) -> None:
    got, answer, _ = web.post("/api/searches", body)
    assert got == status and re.search(error, answer["error"]), answer
    assert "\n" not in answer["error"]


def test_unknown_and_conflicting_calls(web) -> None:
    assert web.get("/api/searches/0123abcd")[0] == 404
    assert web.get("/api/searches/0123abcd/candidates")[0] == 404
    assert web.request("DELETE", "/api/searches/0123abcd")[0] == 404
    job_id = web.search(NEVER)
    web.wait(job_id)
    status, body, _ = web.get(f"/api/searches/{job_id}/candidates?rule=other")
    assert status == 404 and "other" in body["error"]
    status, body, _ = web.request("DELETE", f"/api/searches/{job_id}")
    assert status == 409 and "nothing to cancel" in body["error"]
    assert web.request("DELETE", f"/api/searches/{job_id}?purge=true")[1] == {
        "id": job_id,
        "status": "purged",
    }
    assert web.get(f"/api/searches/{job_id}")[0] == 404


def test_other_host_names_are_refused_without_a_token(web) -> None:
    host = web.url.split("//")[1]
    for name, status in ((f"evil.example:{host.split(':')[1]}", 400), (host, 200), ("localhost", 200)):
        call = urllib.request.Request(web.url + "/api/searches", headers={"Host": name})
        try:
            with urllib.request.urlopen(call, timeout=30) as response:
                assert (name, response.status) == (name, status)
        except urllib.error.HTTPError as exc:
            assert (name, exc.code) == (name, status)


def test_openapi_info_and_rule_check(web, forest) -> None:
    status, schema, _ = web.get("/openapi.json")
    assert status == 200
    for path in ("/api/searches", "/api/searches/{job_id}", "/api/searches/{job_id}/candidates"):
        assert path in schema["paths"]
    assert {"post", "get"} <= set(schema["paths"]["/api/searches"])
    assert "delete" in schema["paths"]["/api/searches/{job_id}"]
    _, info, _ = web.get("/api/info")
    assert info["mode"] == "root" and info["target"] == str(forest[0].resolve())
    assert info["documents"] >= 12 and info["store_path"] is True and info["allow_download"] is True

    text = C2 + 'rule short {\n  strings:\n    $s = "ab"\n  condition:\n    $s\n}\n'
    status, report, _ = web.post("/api/rule-check", {"rule": text})
    assert status == 200
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert by_rule["c2"]["status"] == "searchable" and by_rule["c2"]["notes"] == []
    (note,) = by_rule["short"]["notes"]
    assert (note["code"], note["line"]) == ("string-unanchored", 9)
    status, body, _ = web.post("/api/rule-check", {"rule": "rule x {"})
    assert status == 400 and body["line"] == 1


def _web_exits(*args: str) -> subprocess.CompletedProcess:
    """`sspry web ARGS` expected to refuse its arguments and exit (no terminal: nothing may prompt)."""
    return subprocess.run(
        [sys.executable, "-m", "sspry", "web", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_download_only_indexed_files_checked_against_their_id(web, forest, tmp_path) -> None:
    _, corpus = forest
    job = web.wait(web.search(C2))
    assert job["status"] == "done"
    status, data, headers = web.get(f"/api/files/{PLANTED_ID}")
    assert status == 200 and data == PLANTED
    assert (
        headers["content-type"] == "application/octet-stream"
        and "attachment" in headers["content-disposition"]
    )
    assert web.get("/api/files/" + "ab" * 32)[0] == 404  # in no search's results
    assert web.get("/api/files/..%2F..%2Fetc%2Fpasswd")[0] in (400, 404)
    # the files change: the page says so instead of sending other bytes
    for name in ("dropper.bin", "copy-of-dropper.bin"):
        (corpus / name).write_bytes(b"changed")
    try:
        status, body, _ = web.get(f"/api/files/{PLANTED_ID}")
        assert status == 409 and "changed since it was indexed" in body["error"]
    finally:
        for name in ("dropper.bin", "copy-of-dropper.bin"):
            (corpus / name).write_bytes(PLANTED)


def test_token_downloads_off_and_listen_rules(forest, tmp_path) -> None:
    root, _ = forest
    web = start_web("--root", str(root), state_dir=tmp_path / "state", token="s3cret-token")
    try:
        status, body, headers = web.get("/api/searches", token=None)
        assert status == 401 and "Bearer" in body["error"] and headers["www-authenticate"] == "Bearer"
        assert web.get("/api/searches", token="wrong")[0] == 401
        assert web.get("/api/searches")[0] == 200
        assert web.get("/", token=None)[0] == 200  # the page itself asks for the token
        status, body, _ = web.get(f"/api/files/{PLANTED_ID}")
        assert status == 403 and "--allow-download" in body["error"]
    finally:
        web.stop()
    refused = _web_exits("--root", str(root), "--listen", "0.0.0.0:0")
    assert refused.returncode == 2 and "not a loopback address: give --token" in refused.stderr
    both = _web_exits("--root", str(root), "--addr", "127.0.0.1:1")
    assert both.returncode == 2 and "give --root DIR" in both.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_https(forest, tmp_path) -> None:
    root, _ = forest
    cert, key = make_cert(tmp_path, "web")
    web = start_web(
        "--root", str(root), "--tls-cert", str(cert), "--tls-key", str(key), state_dir=tmp_path / "s", ca=cert
    )
    try:
        assert web.url.startswith("https://127.0.0.1:")
        assert web.wait(web.search(C2))["candidate_total"] == 1
    finally:
        web.stop()
    tls = ("--tls-cert", str(key), "--tls-key", str(key), "--state-dir", str(tmp_path / "s2"))
    wrong = _web_exits("--root", str(root), *tls)
    assert wrong.returncode == 2 and f"--tls-cert {key} is not a PEM certificate" in wrong.stderr, (
        wrong.stderr
    )
    # an encrypted key is refused in one line, never with a passphrase prompt on the terminal
    locked = tmp_path / "locked.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes128", "-passout", "pass:secret", "-out", str(locked)],
        check=True,
    )
    tls = ("--tls-cert", str(cert), "--tls-key", str(locked), "--state-dir", str(tmp_path / "s3"))
    wrong = _web_exits("--root", str(root), *tls)
    assert wrong.returncode == 2 and "is encrypted" in wrong.stderr, wrong.stderr


def test_jobs_are_bounded_cancelled_and_survive_restarts(forest, tmp_path) -> None:
    root, _ = forest
    state = tmp_path / "state"
    web = start_web("--root", str(root), "--max-jobs", "1", state_dir=state)
    many = "".join(
        f'rule r{n} {{ strings: $a = "token-{n:05d}-abcdef" $b = {{ 4? 5? [2-8] 6{n % 10} }} '
        "condition: $a or $b }\n"
        for n in range(3000)
    )
    try:
        first = web.search(many)
        second = web.search(C2)
        running = web.wait(first, until=("running",))
        assert running["rule_total"] in (None, 3000)
        assert web.get(f"/api/searches/{second}")[1]["status"] == "queued"  # one job at a time
        assert web.request("DELETE", f"/api/searches/{second}")[1]["status"] == "cancelled"
        assert web.request("DELETE", f"/api/searches/{first}")[0] == 200
        cancelled = web.wait(first)
        assert cancelled["status"] == "cancelled" and cancelled["rules_done"] < 3000
        done = web.wait(web.search(C2))
        assert done["status"] == "done"
        interrupted = web.search(many)
        web.wait(interrupted, until=("running",))
    finally:
        web.stop()  # SIGTERM while `interrupted` runs: it is left to start over

    # a job that was running when the web server died starts over; one interrupted twice is failed
    db = sqlite3.connect(state / "jobs.sqlite3")
    with db:
        db.execute("UPDATE jobs SET status = 'running', attempts = 1 WHERE id = ?", (done["id"],))
        db.execute("UPDATE jobs SET status = 'running', attempts = 2 WHERE id = ?", (second,))
    db.close()
    web = start_web("--root", str(root), state_dir=state)
    try:
        _, listing, _ = web.get("/api/searches")
        assert {j["id"] for j in listing["searches"]} >= {first, second, done["id"]}
        again = web.wait(interrupted)
        assert again["status"] == "done" and again["rules_done"] == again["rule_total"] == 3000, again
        resumed = web.wait(done["id"])
        assert resumed["status"] == "done" and resumed["candidate_total"] == 1
        _, page, _ = web.get(f"/api/searches/{done['id']}/candidates")
        assert [c["source_id"] for c in page["candidates"]] == [PLANTED_ID]
        failed = web.get(f"/api/searches/{second}")[1]
        assert failed["status"] == "failed" and "restart" in failed["error"]
        assert web.get(f"/api/searches/{first}")[1]["status"] == "cancelled"
        # only one web server per state directory
        other = subprocess.run(
            [*(sys.executable, "-m", "sspry", "web", "--root", str(root)), "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 2 and "another sspry web uses the state directory" in other.stderr
    finally:
        web.stop()


def test_over_a_server(tmp_path) -> None:
    root, corpus = build_forest(tmp_path / "served", binaries=6)
    server = subprocess.Popen(
        [sys.executable, "-m", "sspry", "serve", "--root", str(root), "--addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 60)
        line = server.stdout.readline() if ready else ""
        match = re.search(r"listening on (\S+)", line)
        assert match, (line, server.poll())
        web = start_web("--addr", match.group(1), state_dir=tmp_path / "state")
        try:
            _, info, _ = web.get("/api/info")
            assert info["mode"] == "servers" and info["target"] == match.group(1) and info["documents"] >= 6
            job = web.wait(web.search(C2 + NEVER, verify=True))
            assert job["status"] == "done" and job["rules_done"] == 2, job
            _, page, _ = web.get(f"/api/searches/{job['id']}/candidates?rule=c2")
            (found,) = page["candidates"]
            assert found["source_id"] == PLANTED_ID and found["verified"] is True
            assert sorted(found["paths"]) == sorted(
                str(corpus / n) for n in ("copy-of-dropper.bin", "dropper.bin")
            )
            status, report, _ = web.post("/api/rule-check", {"rule": C2})
            assert status == 200 and report["rules"][0]["status"] == "searchable"
            # the server goes away: calls say so in one line, a search fails with the reason
            server.terminate()
            server.wait(30)
            status, body, _ = web.get("/api/info")
            assert status == 502 and match.group(1) in body["error"], body
            failed = web.wait(web.search(C2))
            assert failed["status"] == "failed" and match.group(1) in failed["error"], failed
            assert web.get(f"/api/searches/{job['id']}/candidates")[1]["total"] == 1  # the history stays
        finally:
            web.stop()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


def test_state_dir_default_is_per_target(tmp_path) -> None:
    from sspry.web.serve import default_state_dir

    a = default_state_dir("root:/data/forest")
    assert a.parent.name == "sspry-web" and a.name.startswith("forest-")
    assert a != default_state_dir("root:/other/forest") != default_state_dir("servers:127.0.0.1:17653")
