"""One server: address parsing, channel (TLS or not), token, timeouts, and error messages that name it."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence

import grpc

from sspry.v1 import sspry_pb2, sspry_pb2_grpc
from sspry.wire import row_frames

DEFAULT_PORT = 17653
DEFAULT_ADDR = f"127.0.0.1:{DEFAULT_PORT}"
ADDR_ENV = "SSPRY_ADDR"
TOKEN_ENV = "SSPRY_TOKEN"
SEARCH_TIMEOUT_MIN_S = 180.0
# the least time a health check is given: the server's event loop answers it, but it waits for the GIL
# while a search thread is in a C++ call that holds it (yaramod parsing Yara-Rules whole: about 1.4 s)
HEALTH_MIN_S = 2.0
BUSY_RETRIES = 6  # a busy server is asked again after 0.5, 1, 2, ... 30 s


class ClientError(Exception):
    """A server refused or failed a call; the message names the server, `code` is the gRPC status (None
    for problems found before any call)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code

    @property
    def bad_input(self) -> bool:
        """The caller's mistake (bad input, wrong token), not the server's trouble."""
        return self.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)


class OfflineError(ClientError):
    """A server could not be reached."""


def check_port(port: str, *, listen: bool = False) -> int:
    """A TCP port from 1 to 65535; 0 too when `listen` (the server picks a free one). grpc takes any
    number and binds something else (99999 became 34463, -5 became 65531), so every address is checked here
    before grpc sees it."""
    low = 0 if listen else 1
    if not (port.isascii() and port.isdigit() and low <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number from {low} to 65535")
    return int(port)


def normalize_addr(text: str, *, listen: bool = False) -> str:
    """`host`, `host:port`, `[ipv6]`, `[ipv6]:port`, a bare IPv6 address, with or without `http(s)://`,
    as `host:port` (port 17653 when omitted; see `check_port` for the range)."""
    addr = re.sub(r"^https?://", "", text.strip()).rstrip("/")
    if not addr:
        raise ValueError("empty server address")
    if addr.startswith("["):
        inside, closed, rest = addr[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        host, port = f"[{inside}]", rest[1:]
    elif addr.count(":") > 1:  # bare IPv6
        host, port = f"[{addr}]", ""
    else:
        host, _, port = addr.partition(":")
    try:
        return f"{host}:{check_port(port, listen=listen) if port else DEFAULT_PORT}"
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None


def parse_addrs(text: str | None, *, listen: bool = False) -> list[str]:
    """Comma-separated addresses (default `$SSPRY_ADDR`, then 127.0.0.1:17653), normalised, deduplicated."""
    text = text or os.environ.get(ADDR_ENV) or DEFAULT_ADDR
    addrs = [normalize_addr(part, listen=listen) for part in text.split(",") if part.strip()]
    if not addrs:
        raise ValueError("no server address")
    return list(dict.fromkeys(addrs))


class Connection:
    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        tls_ca: bytes | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = 64 << 20,
    ):
        self.addr = addr
        self.tls = tls_ca is not None
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca is not None:
            self.channel = grpc.secure_channel(
                addr, grpc.ssl_channel_credentials(root_certificates=tls_ca), options
            )
        else:
            self.channel = grpc.insecure_channel(addr, options)
        self.stub = sspry_pb2_grpc.SspryStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def _error(self, exc: grpc.RpcError) -> ClientError:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            details = exc.details() or ""
            hint = self._tls_hint(details)
            message = f"server {self.addr} is not reachable ({code.name.lower()}: {details}){hint}"
            return OfflineError(message, code)
        return ClientError(f"server {self.addr}: {code.name}: {exc.details()}", code)

    def _tls_hint(self, details: str) -> str:
        """A hint when the two ends seem to disagree on TLS. grpc does not say so; these are the details it
        gives (grpcio 1.85): a plaintext client sees a TLS server close the socket, a TLS client reads a
        plaintext server's reply as a bad TLS record, and a --tls-ca that is not PEM fails the handshaker."""
        if not self.tls and re.search(r"socket closed|connection reset", details, re.IGNORECASE):
            return "; if the server uses TLS, pass its CA certificate with --tls-ca"
        if self.tls and "WRONG_VERSION_NUMBER" in details:
            return "; the server may not use TLS: try without --tls-ca"
        if self.tls and "security handshaker" in details:
            return "; is the --tls-ca file a PEM certificate?"
        return ""

    def _unary(self, method, request, timeout: float | None = None):
        """A call; one whose deadline is longer than the timeout (`timeout`) is watched (_watched)."""
        try:
            if timeout is None or timeout <= self.timeout:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            return self._watched(method.future(request, timeout=timeout, metadata=self.metadata))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _watched(self, call):
        """The result of a call (a future) allowed longer than the timeout, each silence of the timeout
        answered by `after_silence`. Raises the call's grpc.RpcError."""
        while True:
            try:
                return call.result(timeout=self.timeout)
            except grpc.FutureTimeoutError:
                self.after_silence(call)

    def after_silence(self, call) -> None:
        """`call` (allowed longer than the timeout) has gone a timeout without an answer: the server must
        pass a health check (check_alive), or the call is cancelled and the server is offline
        (OfflineError). So a server that stopped answering is found in the timeout plus the check's
        (at least HEALTH_MIN_S), not at the call's deadline (minutes), while a busy one is waited for."""
        try:
            self.check_alive()
        except OfflineError:
            call.cancel()
            raise

    def check_alive(self) -> None:
        """OfflineError unless the server answers the standard health check within the timeout (at least
        HEALTH_MIN_S). A busy server still answers it (its event loop serves it, not a search thread)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check = health_pb2_grpc.HealthStub(self.channel).Check
        try:
            check(
                health_pb2.HealthCheckRequest(),
                timeout=max(self.timeout, HEALTH_MIN_S),
                metadata=self.metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def info(self) -> sspry_pb2.InfoResponse:
        return self._unary(self.stub.Info, sspry_pb2.InfoRequest())

    def insert(self, rows: Sequence[sspry_pb2.DocumentRow]) -> sspry_pb2.InsertSummary:
        """Send rows; returns once the server has made them durable. A server busy with other inserts
        (RESOURCE_EXHAUSTED, nothing written) is asked again after a growing pause."""
        for attempt in range(BUSY_RETRIES + 1):
            frames = row_frames(rows, self.max_message_bytes)
            try:
                call = self.stub.Insert.future(
                    frames, timeout=max(self.timeout, 600.0), metadata=self.metadata
                )
                return self._watched(call)
            except grpc.RpcError as exc:
                busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in (
                    exc.details() or ""
                )
                if not busy or attempt == BUSY_RETRIES:
                    raise self._error(exc) from None
            time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def exists(self, source_ids: list[bytes], files: list[sspry_pb2.FileStamp] | None = None) -> list[bool]:
        """Which documents the server holds; with `files`, it records them for those it holds."""
        request = sspry_pb2.ExistsRequest(source_ids=source_ids, files=files or [])
        return list(self._unary(self.stub.Exists, request).present)

    def known_files(self, files: list[sspry_pb2.FileStamp]) -> list[bool]:
        request = sspry_pb2.KnownFilesRequest(files=files)
        return list(self._unary(self.stub.KnownFiles, request, timeout=max(self.timeout, 120.0)).known)

    def publish(self) -> sspry_pb2.PublishResponse:
        return self._unary(self.stub.Publish, sspry_pb2.PublishRequest(), timeout=max(self.timeout, 3600.0))

    def delete(self, source_ids: list[bytes], paths: list[str]) -> sspry_pb2.DeleteResponse:
        request = sspry_pb2.DeleteRequest(source_ids=source_ids, paths=paths)
        return self._unary(self.stub.Delete, request, timeout=max(self.timeout, 600.0))

    def search(self, request: sspry_pb2.SearchRequest) -> SearchCall:
        """Start a search; iterate the result for its frames, `cancel()` to abandon it."""
        call = self.stub.Search(
            request, timeout=max(self.timeout, SEARCH_TIMEOUT_MIN_S), metadata=self.metadata
        )
        return SearchCall(self, call)

    def shutdown(self) -> str:
        return self._unary(self.stub.Shutdown, sspry_pb2.ShutdownRequest()).message


class SearchCall:
    """A search's frames from one server, with errors that name it."""

    def __init__(self, connection: Connection, call):
        self.connection = connection
        self._call = call

    def __iter__(self) -> Iterator[sspry_pb2.SearchFrame]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise self.connection._error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()
