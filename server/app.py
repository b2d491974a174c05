"""`sspry serve`: a gRPC server process around one Forest.

Binds loopback by default and never shares a port with another process, serves the standard health and
reflection services beside `sspry.v1.Sspry`, optionally TLS and a shared token, and drains cleanly on
SIGINT/SIGTERM or a Shutdown call: no new calls, the ones in flight finish, the ingest log is closed, the
Forest's writer lock released. A server that cannot start as asked (address, port, TLS files) raises
`ServeError` saying why in one line, having released the Forest.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sspry.server.service import DEFAULT_LIMITS, SETTLE_AFTER_S, Limits, Maintenance, SspryService
from sspry.store.forest import Forest
from sspry.v1 import sspry_pb2

SERVICE_NAME = sspry_pb2.DESCRIPTOR.services_by_name["Sspry"].full_name
log = logging.getLogger("sspry.server")
DRAIN_SECONDS = 30


class ServeError(Exception):
    """The server cannot start as asked: an address it cannot bind, TLS files it cannot use."""


def load_tls(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The certificate chain and private key as PEM bytes, checked with the `ssl` module: grpc refuses a bad
    file only as "Failed to bind" (the reason goes to its log), and takes an encrypted key only to fail."""
    try:
        chain, private = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise ServeError(f"cannot read {exc.filename}: {exc.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", chain, re.DOTALL)
    try:
        if not blocks:
            raise ValueError("no PEM certificate")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=b"\n".join(blocks).decode())
    except (ssl.SSLError, ValueError):  # ValueError: no block, or one that is not ASCII
        raise ServeError(f"--tls-cert {cert} is not a PEM certificate") from None

    def no_password() -> bytes:  # instead of OpenSSL prompting on the terminal
        raise ServeError(f"--tls-key {key} is encrypted: give the key without a passphrase")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ServeError(f"--tls-key {key} does not match --tls-cert {cert}") from None
        raise ServeError(f"--tls-key {key} is not a PEM private key") from None
    return chain, private


def check_bindable(addr: str) -> None:
    """Bind and release each address `addr` ("host:port") resolves to, so that a port in use, an address
    not on this host or a name that does not resolve is refused with its reason: grpc says only "Failed to
    bind". Like grpc, a name resolving to several addresses needs only one of them bindable, but a port
    that another process holds on any of them is refused."""
    host, _, port = addr.rpartition(":")
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {addr}: {exc.strerror}") from None
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                errors.append(exc)
    in_use = [exc for exc in errors if exc.errno == errno.EADDRINUSE]
    if in_use or len(errors) == len(found):
        raise ServeError(f"cannot listen on {addr}: {(in_use or errors)[0].strerror}")


class Server:
    """An asyncio gRPC server around one Forest; `run()` serves until `stop()` (a signal, a Shutdown call)."""

    def __init__(
        self,
        forest: Forest,
        addr: str,
        *,
        token: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        max_message_bytes: int = 64 << 20,
        search_workers: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        settle_after_s: float = SETTLE_AFTER_S,
    ):
        self.forest = forest
        self.requested = addr
        self.tls = tls
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # grpcio sets SO_REUSEPORT by default: a second server on a busy port would share it and clients
            # would alternate between the two forests
            ("grpc.so_reuseport", 0),
        ]
        self.service = SspryService(
            forest, token=token, search_workers=search_workers, limits=limits, on_shutdown=self.stop
        )
        self.maintenance = Maintenance(self.service, settle_after_s=settle_after_s)
        self.addr = ""
        self._stopping: asyncio.Event | None = None
        check_bindable(addr)

    async def _bind(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=self.options)
        server.add_generic_rpc_handlers((self.service.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        addr = self.requested
        try:
            if self.tls is None:
                port = server.add_insecure_port(addr)
            else:
                credentials = grpc.ssl_server_credentials([(self.tls[1], self.tls[0])])
                port = server.add_secure_port(addr, credentials)
        except RuntimeError:  # "Failed to bind": taken since check_bindable, or TLS files grpc refuses
            port = 0
        if port == 0:
            tls_files = "" if self.tls is None else " with the TLS certificate and key"
            raise ServeError(f"cannot listen on {addr}: grpc could not bind it{tls_files}")
        self.addr = f"{addr.rsplit(':', 1)[0]}:{port}"
        return server

    async def run(self, on_started: Callable[[str], None] = lambda addr: None) -> None:
        """Serve until stopped, then drain: no new calls, the ones in flight finish (up to DRAIN_SECONDS),
        the maintenance thread and the thread pools stop. The caller closes the Forest."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await self._bind()
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.maintenance.start()
        on_started(self.addr)
        log.info("serving %s on %s", self.forest.root, self.addr)
        await self._stopping.wait()
        log.info("stopping: draining calls in flight")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(DRAIN_SECONDS)
        self.maintenance.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)

    def stop(self) -> None:
        """Begin draining (idempotent; from the event loop or any thread)."""
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)


def serve(
    root: Path,
    addr: str,
    *,
    token: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_message_bytes: int,
    search_workers: int,
    limits: Limits = DEFAULT_LIMITS,
    settle_after_s: float = SETTLE_AFTER_S,
) -> None:
    tls = load_tls(tls_cert, tls_key) if tls_cert and tls_key else None
    forest = Forest.open(root, writable=True)
    try:
        server = Server(
            forest,
            addr,
            token=token,
            tls=tls,
            max_message_bytes=max_message_bytes,
            search_workers=search_workers,
            limits=limits,
            settle_after_s=settle_after_s,
        )

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, server.stop)
            await server.run(lambda at: print(f"sspry server listening on {at}", flush=True))

        asyncio.run(main())
    finally:
        forest.close()
    print("sspry server stopped", flush=True)
