"""Real servers on loopback: the gRPC surface end to end, fan-out over two servers, bad input on the
wire, token and TLS. Each server is a separate `sspry serve` process, stopped by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sspry.cli import main
from sspry.client.cluster import _stamps
from sspry.client.connection import ClientError
from sspry.document import Document
from sspry.policy import POLICY_VERSION, Policy
from sspry.progress import Progress, Stage
from sspry.query.search import search_rule_file
from sspry.store.forest import Forest
from sspry.v1 import sspry_pb2, sspry_pb2_grpc
from tests.conftest import settle
from tests.test_store import make_doc


class ServerProcess:
    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None):
        self.root = root
        command = [
            sys.executable,
            "-m",
            "sspry",
            "serve",
            "--root",
            str(root),
            "--addr",
            "127.0.0.1:0",
            *extra,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line}{self.process.stderr.read()}")
        self.addr = line.rsplit(" ", 1)[1].strip()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.output)
    return result


@pytest.fixture
def servers(tmp_path):
    started: list[ServerProcess] = []

    def start(name: str, *extra: str, policy: Policy | None = None) -> ServerProcess:
        root = tmp_path / name
        Forest.init(root, policy or Policy(store_path=True, shards=2))
        server = ServerProcess(root, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_two_servers_index_search_delete_info_shutdown(servers, indexed_corpus, tmp_path) -> None:
    a, b = servers("a"), servers("b")
    addrs = f"{a.addr},{b.addr}"
    generated = str(indexed_corpus.corpus.directory)
    summary = json.loads(run("index", "--addr", addrs, "--json", "--batch-bytes", "65536", generated).stdout)
    assert summary["submitted_documents"] == len(indexed_corpus.corpus.files)
    per_server = summary["servers"]
    assert all(counts["inserted"] > 0 for counts in per_server.values()), "batches go to both servers"
    infos = {i["addr"]: i for i in json.loads(run("info", "--addr", addrs).stdout)}
    # the summary is what the servers hold after the run, per server and in total
    assert {addr: counts["inserted"] for addr, counts in per_server.items()} == {
        addr: info["documents"] for addr, info in infos.items()
    }
    assert summary["inserted_documents"] == sum(i["documents"] for i in infos.values())
    assert summary["inserted_documents"] + summary["duplicate_documents"] == summary["submitted_documents"]
    again = json.loads(run("index", "--addr", addrs, "--json", "--batch-bytes", "65536", generated).stdout)
    assert again["inserted_documents"] == again["submitted_documents"] == 0  # nothing read again
    assert again["already_indexed_files"] == len(indexed_corpus.corpus.files)

    # the same rules on a local forest built from the same files give the same candidates
    local = tmp_path / "local"
    Forest.init(local, Policy(store_path=True, shards=2))
    with Forest.open(local, writable=True) as forest:
        from sspry.indexing import index_paths

        index_paths(forest, [generated])
        expected, _ = search_rule_file(forest, str(indexed_corpus.rules))
    remote = json.loads(run("search", "--addr", addrs, "--rule", str(indexed_corpus.rules), "--json").stdout)
    assert sorted(remote["servers"]) == sorted(addrs.split(","))
    assert remote["documents"] == expected.documents
    for mine, theirs in zip(expected.rules, remote["rules"], strict=True):
        assert mine.name == theirs["rule"]
        assert {c.source_id.hex() for c in mine.candidates} == {c["source_id"] for c in theirs["candidates"]}

    streamed = run("search", "--addr", addrs, "--rule", str(indexed_corpus.rules), "--ndjson", "--limit", "3")
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [line["rule"] for line in lines[:-1]] == [r.name for r in expected.rules]
    assert [line["candidate_count"] for line in lines[:-1]] == [r.candidate_count for r in expected.rules]
    assert all(len(line["candidates"]) == min(3, line["candidate_count"]) for line in lines[:-1])
    assert sorted(lines[-1]["summary"]["servers"]) == sorted(addrs.split(","))
    counted = run("search", "--addr", addrs, "--rule", str(indexed_corpus.rules), "--json", "--count").stdout
    assert [r["candidate_count"] for r in json.loads(counted)["rules"]] == [
        r.candidate_count for r in expected.rules
    ]
    verified = json.loads(
        run("search", "--addr", addrs, "--rule", str(indexed_corpus.rules), "--json", "--verify").stdout
    )
    assert any(c["verified"] for r in verified["rules"] for c in r["candidates"])
    # the servers sent each path's stamp, which still holds: no file was hashed to check it
    assert verified["verification"]["files"] > 0 and verified["verification"]["hashed_files"] == 0

    infos = json.loads(run("info", "--addr", addrs).stdout)
    assert [i["addr"] for i in infos] == addrs.split(",")
    total = sum(i["documents"] for i in infos)
    assert total == expected.documents

    victim = indexed_corpus.corpus.files[0]
    deleted = run("delete", "--addr", addrs, str(victim)).stdout
    assert "status: deleted" in deleted
    assert sum(i["documents"] for i in json.loads(run("info", "--addr", addrs).stdout)) == total - 1
    run("delete", "--addr", addrs, "00" * 32, code=1)

    assert "shutdown requested" in run("shutdown", "--addr", addrs).stdout
    assert a.process.wait(timeout=60) == 0 and b.process.wait(timeout=60) == 0
    with Forest.open(a.root, writable=True):  # the writer lock was released
        pass


def test_offline_servers(servers, tmp_path) -> None:
    server = servers("a")
    down = "127.0.0.1:9"  # nothing listens there
    files = tmp_path / "files"
    files.mkdir()
    (files / "one.txt").write_text("offline test file with a needle-alpha inside")
    rules = tmp_path / "r.yar"
    rules.write_text('rule alpha { strings: $a = "needle-alpha" condition: $a }')
    result = run("index", "--addr", f"{server.addr},{down}", str(files), code=1)
    assert down in result.output and "not reachable" in result.output
    result = run("index", "--addr", f"{server.addr},{down}", "--ignore-offline", "--timeout", "2", str(files))
    assert f"offline_servers: {down}" in result.stdout and down in result.stderr
    result = run(
        "search", "--addr", f"{server.addr},{down}", "--rule", str(rules), "--ignore-offline", "--json"
    )
    data = json.loads(result.stdout)
    assert data["rules"][0]["candidate_count"] == 1
    assert data["offline_servers"] == [down] and data["servers"] == [server.addr]
    assert f"skipped offline server: server {down}" in result.stderr
    plain = run("search", "--addr", f"{server.addr},{down}", "--rule", str(rules), "--ignore-offline")
    assert down in plain.stderr
    run("search", "--addr", f"{server.addr},{down}", "--rule", str(rules), code=1)


def test_policies_must_match_before_any_upload(servers, tmp_path) -> None:
    a = servers("a", policy=Policy(gram_sizes=(3, 4)))
    b = servers("b", policy=Policy(gram_sizes=(4, 5)))
    files = tmp_path / "files"
    files.mkdir()
    (files / "f").write_text("some content")
    result = run("index", "--addr", f"{a.addr},{b.addr}", str(files), code=1)
    assert "disagree on the policy" in result.output
    for server in (a, b):
        assert json.loads(run("info", "--addr", server.addr).stdout)["pending_log_bytes"] == 0


def test_searches_after_the_first_learn_the_policy_from_their_answers(servers, monkeypatch) -> None:
    """A Cluster asks each server for its policy (Info) once; later searches check it from the first
    frame of each answer, one round trip less, and still refuse servers whose policies differ."""
    from sspry.client.cluster import Cluster
    from sspry.client.connection import Connection

    a = servers("a", policy=Policy(gram_sizes=(3, 4)))
    b = servers("b", policy=Policy(gram_sizes=(4, 5)))
    infos = []
    info = Connection.info
    monkeypatch.setattr(Connection, "info", lambda self: infos.append(self.addr) or info(self))
    rule = 'rule r { strings: $a = "needle" condition: $a }'
    with Cluster([a.addr]) as one:
        first = one.search(rule=rule)
        assert infos == [a.addr] and one.policy == Policy(gram_sizes=(3, 4))
        again = one.search(rule=rule)
        assert infos == [a.addr] and again.rules[0].name == first.rules[0].name == "r"
    with Cluster([a.addr, b.addr]) as both:
        both.policy = Policy(gram_sizes=(3, 4))  # as if an earlier call had met only `a`
        with pytest.raises(ClientError, match="disagree on the policy"):
            both.search(rule=rule)
    assert infos == [a.addr]


def test_bad_input_on_the_wire(servers) -> None:
    server = servers("a", "--max-message-bytes", str(1 << 20))
    channel = grpc.insecure_channel(server.addr)
    stub = sspry_pb2_grpc.SspryStub(channel)
    policy = Policy(store_path=True, shards=2)
    good = make_doc(policy, __import__("random").Random(1)).to_row()

    def insert(frames) -> grpc.StatusCode:
        try:
            stub.Insert(iter(frames), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    wrong_bloom = sspry_pb2.DocumentRow()
    wrong_bloom.CopyFrom(good)
    wrong_bloom.tier1.bits = b"\x00" * 100
    short_id = sspry_pb2.DocumentRow()
    short_id.CopyFrom(good)
    short_id.source_id = b"\x01" * 5
    payload = good.SerializeToString()
    assert insert(
        [sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=wrong_bloom.SerializeToString(), row_end=True)]
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    assert insert(
        [sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=short_id.SerializeToString(), row_end=True)]
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    # a good row from an sspry before policy version 2 (frames without a version): its blooms hash
    # grams another way, so searches would miss it
    assert insert([sspry_pb2.InsertFrame(chunk=payload, row_end=True)]) == grpc.StatusCode.INVALID_ARGUMENT
    # a good row, then a row cut short: the whole call fails, the good row is not written either
    truncated = [
        sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=payload, row_end=True),
        sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=payload[: len(payload) // 2], row_end=False),
    ]
    assert insert(truncated) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        insert([sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=b"\xff\x00garbage", row_end=True)])
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert insert(
        [sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=b"\x00" * (2 << 20), row_end=True)]
    ) == (grpc.StatusCode.RESOURCE_EXHAUSTED)

    def search(source: str, targets: list[str]) -> grpc.StatusCode:
        try:
            list(stub.Search(sspry_pb2.SearchRequest(source=source, targets=targets), timeout=30))
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert search("rule broken { condition: $x }", ["broken"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        search('include "/etc/passwd"\nrule r { condition: true }', ["r"]) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert search("rule r { condition: true }", ["other"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert search("rule r { condition: true }", []) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        stub.Delete(sspry_pb2.DeleteRequest(source_ids=[b"\x01\x02"]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # nothing was written, and the server still serves
    info = json.loads(stub.Info(sspry_pb2.InfoRequest(), timeout=30).json)
    assert info["documents"] == 0 and info["pending_log_bytes"] == 0
    assert (
        insert([sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=payload, row_end=True)])
        == grpc.StatusCode.OK
    )
    assert stub.Publish(sspry_pb2.PublishRequest(), timeout=30).documents == 1
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="sspry.v1.Sspry")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflected = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for reply in reflected for s in reply.list_services_response.service}
    assert "sspry.v1.Sspry" in names and "grpc.health.v1.Health" in names
    channel.close()


def test_token_is_checked_on_every_call(servers, tmp_path) -> None:
    server = servers("a", "--token", "s3cret")
    files = tmp_path / "files"
    files.mkdir()
    (files / "f").write_text("token protected content")
    result = run("index", "--addr", server.addr, str(files), code=2)
    assert "UNAUTHENTICATED" in result.output
    run("index", "--addr", server.addr, "--token", "wrong", str(files), code=2)
    assert json.loads(run("info", "--addr", server.addr, "--token", "s3cret").stdout)["documents"] == 0
    run("index", "--addr", server.addr, "--token", "s3cret", str(files))
    assert json.loads(run("info", "--addr", server.addr, "--token", "s3cret").stdout)["documents"] == 1
    run("shutdown", "--addr", server.addr, "--token", "wrong", code=2)
    assert server.process.poll() is None


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its unencrypted key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls(servers, tmp_path) -> None:
    cert, key = make_cert(tmp_path, "server")
    server = servers("a", "--tls-cert", str(cert), "--tls-key", str(key))
    assert json.loads(run("info", "--addr", server.addr, "--tls-ca", str(cert)).stdout)["documents"] == 0
    # plaintext to a TLS server fails, and says what to do about it
    result = run("info", "--addr", server.addr, "--timeout", "3", code=1)
    assert "not reachable" in result.output and "--tls-ca" in result.output
    plain = servers("b")
    result = run("info", "--addr", plain.addr, "--tls-ca", str(cert), "--timeout", "3", code=1)
    assert "may not use TLS" in result.output
    # a key that is not the certificate's, or not a key at all, stops the server before it listens
    _, other_key = make_cert(tmp_path, "other")
    root = tmp_path / "c"
    Forest.init(root, Policy(shards=2))
    line = serve_fails(root, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert "does not match" in line
    assert "not a PEM private key" in serve_fails(root, "--tls-cert", str(cert), "--tls-key", str(cert))


def serve_fails(root: Path, *args: str) -> str:
    """Run `sspry serve --root ROOT ARGS...`, which must refuse to start: exit 2 and one line on stderr
    (no traceback, nothing on stdout). Returns that line."""
    command = [sys.executable, "-m", "sspry", "serve", "--root", str(root), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert (done.returncode, done.stdout) == (2, ""), (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def test_a_port_in_use_is_refused(servers, tmp_path) -> None:
    a = servers("a")
    other = tmp_path / "other"
    Forest.init(other, Policy(shards=2))
    assert "already in use" in serve_fails(other, "--addr", a.addr)
    # not shared: every call still reaches the first server's forest
    roots = {json.loads(run("info", "--addr", a.addr).stdout)["root"] for _ in range(8)}
    assert roots == {str(a.root)}
    # in this process too: refused, and the forest is released on the way out
    result = run("serve", "--root", str(other), "--addr", a.addr, code=2)
    assert "already in use" in result.output
    with Forest.open(other, writable=True):
        pass


@pytest.mark.parametrize("port", ["99999", "65536", "-5", "abc"])
def test_ports_out_of_range_are_refused(tmp_path, port) -> None:
    root = tmp_path / "a"
    Forest.init(root, Policy(shards=2))
    assert "bad address" in serve_fails(root, "--addr", f"127.0.0.1:{port}")
    assert "bad address" in run("info", "--addr", f"127.0.0.1:{port}", code=2).output
    assert "bad address" in run("index", "--addr", f"[::1]:{port}", str(tmp_path), code=2).output


def test_port_zero_is_for_serve_only(servers) -> None:
    server = servers("a")  # serves on port 0: a free port, printed
    assert not server.addr.endswith(":0")
    assert "from 1 to 65535" in run("info", "--addr", "127.0.0.1:0", code=2).output


def test_an_address_not_on_this_host_is_refused(tmp_path) -> None:
    root = tmp_path / "a"
    Forest.init(root, Policy(shards=2))
    # 192.0.2.0/24 is reserved for documentation: no interface here has it, and nothing is sent to it
    assert "cannot listen on 192.0.2.1:17653" in serve_fails(root, "--addr", "192.0.2.1:17653")


def test_tls_files_that_are_not_pem_are_refused(tmp_path) -> None:
    root = tmp_path / "a"
    Forest.init(root, Policy(shards=2))
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x30\x82 not a certificate\n")
    line = serve_fails(root, "--addr", "127.0.0.1:0", "--tls-cert", str(junk), "--tls-key", str(junk))
    assert "is not a PEM certificate" in line
    with Forest.open(root, writable=True):  # never locked, or released
        pass


def test_signals_drain_and_release_the_forest(servers) -> None:
    server = servers("a")
    assert server.stop() == 0
    assert "sspry server stopped" in server.process.stdout.read()
    with Forest.open(server.root, writable=True):
        pass


def test_serve_needs_an_initialised_root(tmp_path) -> None:
    result = run("serve", "--root", str(tmp_path / "nothing"), "--addr", "127.0.0.1:0", code=2)
    assert "sspry init" in result.output


def test_server_rows_round_trip_documents() -> None:
    policy = Policy()
    doc = make_doc(policy, __import__("random").Random(2))
    doc.fields = {"pe.machine": 332}
    back = Document.from_row(doc.to_row(), policy)
    assert back.fields == {"pe.machine": 332} and back.tier1.tobytes() == doc.tier1.tobytes()


class Recorder(Progress):
    """Remembers every stage and how far each got."""

    def __init__(self):
        self.done: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.totals: dict[str, int | None] = {}

    def stage(self, what: str, total: int | None, unit: str) -> Stage:
        recorder = self
        self.totals[what] = total
        self.done.setdefault(what, 0)
        self.calls.setdefault(what, 0)

        class Counting(Stage):
            def advance(self, amount: int = 1) -> None:
                recorder.done[what] += amount
                recorder.calls[what] += 1

        return Counting()


def test_paths_of_a_document_on_two_servers_keep_their_stamps_for_verification(servers, tmp_path) -> None:
    """The same content indexed from one path into each server: the client merges both paths with the
    stamp each server recorded, so verification hashes a file only when its own stamp no longer holds."""
    a, b = servers("a"), servers("b")
    for name, server in (("one", a), ("two", b)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "same.txt").write_text("both servers hold token-stamped-")
        settle(folder)
        run("index", "--addr", server.addr, str(folder))
    rules = tmp_path / "r.yar"
    rules.write_text('rule r { strings: $a = "token-stamped-" condition: $a }')
    addrs = f"{a.addr},{b.addr}"

    def verified() -> tuple[list[str], dict]:
        out = json.loads(run("search", "--addr", addrs, "--rule", str(rules), "--json", "--verify").stdout)
        [candidate] = out["rules"][0]["candidates"]
        assert candidate["verified"] is True
        return candidate["paths"], out["verification"]

    paths, verification = verified()
    assert sorted(paths) == sorted(str(tmp_path / n / "same.txt") for n in ("one", "two"))
    assert verification["hashed_files"] == 0
    os.utime(paths[0])  # the path verification reads first: its stamp no longer holds
    assert verified()[1]["hashed_files"] == 1
    # stamps that do not pair with the paths (an older or broken server) are not trusted
    sent = sspry_pb2.CandidatePaths(source_id=b"x", paths=["/p", "/q"], sizes=[1], mtimes_ns=[5])
    assert _stamps(sent) == ()


def test_a_kept_cluster_gives_up_on_a_server_that_stopped_answering(servers, tmp_path) -> None:
    """A server that stops answering between two searches of one Cluster (SIGSTOP: its socket still
    accepts, nothing answers) is named offline after about twice the timeout, not at the search's
    deadline (minutes); without ignore_offline the search fails with that message."""
    import sspry

    a, b = servers("a"), servers("b")
    for name, server in (("one", a), ("two", b)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "f.txt").write_text(f"{name} holds token-kept-")
        run("index", "--addr", server.addr, str(folder))
    rule = 'rule r { strings: $a = "token-kept-" condition: $a }'
    with (
        sspry.connect([a.addr, b.addr], timeout=1.0, ignore_offline=True) as kept,
        sspry.connect([a.addr, b.addr], timeout=1.0) as strict,
    ):
        assert len(kept.search(rule=rule).rules[0].candidates) == 2
        assert len(strict.search(rule=rule).rules[0].candidates) == 2
        os.kill(b.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = kept.search(rule=rule)
            elapsed = time.monotonic() - started
            with pytest.raises(ClientError, match=f"server {b.addr} is not reachable"):
                strict.search(rule=rule)
        finally:
            os.kill(b.process.pid, signal.SIGCONT)
    assert result.offline == [b.addr] and elapsed < 10
    assert [c.paths for c in result.rules[0].candidates] == [(str(tmp_path / "one" / "f.txt"),)]


def test_calls_allowed_minutes_give_up_on_a_stopped_server_after_twice_the_timeout(servers) -> None:
    """Publish (an hour's deadline), inserts and the known-files question (minutes) are watched: a
    stopped server is offline after its silence and a failed health check, about twice the timeout."""
    from sspry.client.connection import Connection, OfflineError

    server = servers("a")
    connection = Connection(server.addr, timeout=0.5)
    row = make_doc(Policy(store_path=True, shards=2), __import__("random").Random(3)).to_row()
    assert connection.publish().inserted == 0  # answered at once while it runs
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        for call in (
            connection.publish,
            lambda: connection.insert([row]),
            lambda: connection.known_files([]),
        ):
            started = time.monotonic()
            with pytest.raises(OfflineError, match="is not reachable"):
                call()
            assert time.monotonic() - started < 5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        connection.close()


def test_a_server_silent_while_it_works_passes_the_health_check_and_is_waited_for(
    servers, tmp_path, monkeypatch
) -> None:
    """With a timeout shorter than the server's silences (compiling and planning 10,000 rules), the
    client checks the server's health and goes on waiting: the search completes."""
    import sspry
    from sspry.client.connection import Connection

    server = servers("a")
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "f.txt").write_text("holds token-17-")
    run("index", "--addr", server.addr, str(folder))
    checks: list[str] = []
    check = Connection.check_alive
    monkeypatch.setattr(Connection, "check_alive", lambda self: (checks.append(self.addr), check(self))[1])
    rules = "\n".join(f'rule r{i} {{ strings: $a = "token-{i}-" condition: $a }}' for i in range(10_000))
    with sspry.connect(server.addr, timeout=0.1) as cluster:
        result = cluster.search(rule=rules)
    assert checks and set(checks) == {server.addr} and not result.offline
    assert [r.name for r in result.rules if r.candidates] == ["r17"]


def test_progress_of_planning_a_bundle_on_the_server_and_of_verifying(servers, tmp_path) -> None:
    server = servers("a")
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3):
        (files / f"f{i}").write_text(f"content with token{i}abcdef inside")
    rules = tmp_path / "bundle.yar"
    rules.write_text(
        "".join(
            f'rule r{i} {{ strings: $a = "token{i}abcdef" $b = {{ 0{i % 10} 02 ?? 04 [2-4] 05 }} '
            "condition: $a or $b }\n"
            for i in range(1500)
        )
    )
    import sspry

    with sspry.connect(server.addr) as cluster:
        cluster.index([str(files)])
        recorder = Recorder()
        result = cluster.search(path=str(rules), verify=True, progress=recorder)
    assert recorder.totals == {"planning (servers)": 1500, "verifying": 3}
    assert recorder.done == {"planning (servers)": 1500, "verifying": 3}
    assert recorder.calls["planning (servers)"] > 1500 // 256  # reported while the server planned
    assert result.timings_ms["plan"] > 0 and result.timings_ms["search"] > 0
    verified = [[c.verified for c in r.candidates if c.verified] for r in result.rules[:4]]
    assert verified == [[True], [True], [True], []]


def _info(addr: str) -> dict:
    return json.loads(run("info", "--addr", addr).stdout)


def _wait_for(what, timeout_s: float = 30.0):
    """`what()` once it is truthy, polling; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


def test_an_idle_server_merges_each_shard_into_one_segment(servers, indexed_corpus) -> None:
    """After --settle-after seconds without inserts each shard holds one segment, and searches find what
    they found before."""
    server = servers("settle", "--settle-after", "4")
    files = [str(p) for p in indexed_corpus.corpus.files]
    for part in (files[::2], files[1::2]):  # two publishes: two segments in each shard
        published = _info(server.addr)["documents"]
        published += json.loads(run("index", "--addr", server.addr, "--json", *part).stdout)[
            "inserted_documents"
        ]
        _wait_for(lambda n=published: _info(server.addr)["documents"] == n)
    before = _info(server.addr)
    assert before["segments"] == 4  # 2 shards, and the size-tiered compaction merges only 4 at a time
    search = ("search", "--addr", server.addr, "--rule", str(indexed_corpus.rules), "--json")
    found = [r["candidate_count"] for r in json.loads(run(*search).stdout)["rules"]]
    _wait_for(lambda: _info(server.addr)["segments"] == 2)
    after = _info(server.addr)
    assert after["documents"] == before["documents"] and after["generation"] > before["generation"]
    assert [r["candidate_count"] for r in json.loads(run(*search).stdout)["rules"]] == found
