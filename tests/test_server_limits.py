"""No client can stop the server: idle streams, a budget for insert bytes in flight, searches whose client
left, and bytes that are not messages at all. Real `sspry serve` processes on loopback."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sspry.policy import POLICY_VERSION, Policy
from sspry.store.forest import Forest
from sspry.v1 import sspry_pb2, sspry_pb2_grpc
from tests.test_server import ServerProcess


@pytest.fixture
def serve(tmp_path):
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        root = tmp_path / f"forest{len(started)}"
        Forest.init(root, Policy(shards=2))
        server = ServerProcess(root, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def info(stub) -> dict:
    return json.loads(stub.Info(sspry_pb2.InfoRequest(), timeout=5).json)


def test_idle_insert_streams_neither_starve_the_server_nor_live_forever(serve) -> None:
    server = serve("--idle-timeout", "3")
    channel = grpc.insecure_channel(server.addr)
    stub = sspry_pb2_grpc.SspryStub(channel)
    silent = threading.Event()

    def nothing():
        silent.wait()  # a client that opens a stream and never sends
        yield from ()

    calls = [stub.Insert.future(nothing(), timeout=120) for _ in range(40)]
    time.sleep(0.5)
    started = time.monotonic()
    assert info(stub)["documents"] == 0  # Info answers at once, beside 40 idle streams
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < 5
    codes = {call.exception(timeout=30).code() for call in calls}  # the server ended every one of them
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
    silent.set()
    channel.close()


def test_insert_bytes_in_flight_share_one_budget(serve) -> None:
    server = serve("--insert-budget-bytes", str(8 << 20), "--max-message-bytes", str(4 << 20))
    channel = grpc.insecure_channel(server.addr, [("grpc.max_send_message_length", 4 << 20)])
    stub = sspry_pb2_grpc.SspryStub(channel)
    hold = threading.Event()
    chunk = b"\x00" * (3 << 20)

    def big_then_wait():
        yield sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=chunk, row_end=False)
        yield sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=chunk, row_end=False)
        hold.wait()  # 6 MiB held by the server, the call still open

    first = stub.Insert.future(big_then_wait(), timeout=60)
    deadline = time.monotonic() + 30
    while info(stub)["insert_bytes_in_flight"] < 6 << 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = rss_kib(server.process.pid)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Insert(
            iter([sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=chunk, row_end=True)]), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server busy" in refused.value.details()
    assert rss_kib(server.process.pid) - before < 64 << 10  # the refused bytes were not kept
    hold.set()
    assert first.exception(timeout=30).code() == grpc.StatusCode.INVALID_ARGUMENT  # no row_end: not a row
    assert info(stub)["insert_bytes_in_flight"] == 0 and info(stub)["pending_log_bytes"] == 0
    channel.close()


def _bundle(rules: int) -> str:
    """Rules that take a while to plan (about a millisecond each)."""
    return "".join(
        f'rule r{i} {{ strings: $a = "slow-{i:06d}-planning" $b = /ab{i}[0-9]{{2,4}}cd/ '
        "condition: $a or $b }\n"
        for i in range(rules)
    )


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_search_stops_when_its_client_leaves(serve, how) -> None:
    server = serve()
    channel = grpc.insecure_channel(server.addr)
    stub = sspry_pb2_grpc.SspryStub(channel)
    source = _bundle(12_000)
    request = sspry_pb2.SearchRequest(source=source, targets=[f"r{i}" for i in range(12_000)])
    call = stub.Search(request, timeout=2 if how == "deadline" else 600)
    deadline = time.monotonic() + 60
    while info(stub)["active_searches"] == 0:
        assert time.monotonic() < deadline, "the search never started"
        time.sleep(0.05)
    if how == "cancel":
        call.cancel()
    left = time.monotonic()
    while info(stub)["active_searches"]:
        assert time.monotonic() - left < 30, "the search kept running after its client left"
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError):
        list(call)
    channel.close()


def test_client_mistakes_are_invalid_argument(serve) -> None:
    server = serve()
    channel = grpc.insecure_channel(server.addr)
    stub = sspry_pb2_grpc.SspryStub(channel)
    garbage = b"\xff\xff\xff\xff\x0fnot a message"
    for method in ("Info", "Exists", "KnownFiles", "Publish", "Delete", "Shutdown"):
        raw = channel.unary_unary(f"/sspry.v1.Sspry/{method}")
        with pytest.raises(grpc.RpcError) as raised:
            raw(garbage, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "not a valid" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(channel.unary_stream("/sspry.v1.Sspry/Search")(garbage, timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        channel.stream_unary("/sspry.v1.Sspry/Insert")(iter([garbage]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:  # 16 + 48 bytes are not two 32-byte Source IDs
        stub.Exists(sspry_pb2.ExistsRequest(source_ids=[b"\x01" * 16, b"\x02" * 48]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "16 bytes" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Search(sspry_pb2.SearchRequest(source="rule r\x00 { condition: true }", targets=["r"])))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rule = "rule r { condition: true }"
    for names, why in (
        (["a", "a"], "each name once"),
        (["a", ""], "each name once"),
        (["a", "b"], "namespace b"),
    ):
        spaces = [sspry_pb2.RuleNamespace(name=n, source=rule, targets=["r"]) for n in names]
        spaces[-1].targets.append("missing")  # the last names a rule its source does not hold
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Search(sspry_pb2.SearchRequest(namespaces=spaces)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in raised.value.details()
    assert info(stub)["documents"] == 0  # and it still serves
    channel.close()


def test_a_full_disk_is_resource_exhausted_and_the_server_goes_on(tmp_path) -> None:
    from sspry.store.diskio import ENOSPC_ENV
    from tests.test_store import make_doc

    root = tmp_path / "forest"
    Forest.init(root, Policy(shards=2))
    Forest.open(root, writable=True).close()  # its catalog is created
    server = ServerProcess(root, env={ENOSPC_ENV: "200"})  # the disk is full after 200 more bytes
    try:
        channel = grpc.insecure_channel(server.addr)
        stub = sspry_pb2_grpc.SspryStub(channel)
        rows = [make_doc(Policy(shards=2), __import__("random").Random(i)).to_row() for i in range(3)]
        frames = [
            sspry_pb2.InsertFrame(version=POLICY_VERSION, chunk=r.SerializeToString(), row_end=True)
            for r in rows
        ]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Insert(iter(frames), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "No space left on device" in refused.value.details()
        assert info(stub)["documents"] == 0  # still serving
        channel.close()
    finally:
        assert server.stop() == 0
