"""`sspry serve`: a gRPC server process around one Forest.

Binds loopback by default and never shares a port with another process, serves the standard health and
reflection services beside `sspry.v1.Sspry`, optionally TLS and a shared token, and drains cleanly on
SIGINT/SIGTERM or a Shutdown call: no new calls, the ones in flight finish, the ingest log is closed, the
Forest's writer lock released. A server that cannot start as asked (address, port, TLS files) raises
`ServeError` saying why in one line, having released the Forest.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sspry.server.service import Maintenance, SspryService
from sspry.store.forest import Forest
from sspry.v1 import sspry_pb2, sspry_pb2_grpc

SERVICE_NAME = sspry_pb2.DESCRIPTOR.services_by_name["Sspry"].full_name
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
    """A running server; `wait()` blocks until it has stopped."""

    def __init__(
        self,
        forest: Forest,
        addr: str,
        *,
        token: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        max_message_bytes: int = 64 << 20,
        search_workers: int = 0,
    ):
        self.forest = forest
        self._stopped = threading.Event()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # grpcio sets SO_REUSEPORT by default: a second server on a busy port would share it and clients
            # would alternate between the two forests
            ("grpc.so_reuseport", 0),
        ]
        self.grpc = grpc.server(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="sspry-rpc"), options=options
        )
        self.service = SspryService(forest, token=token, search_workers=search_workers, on_shutdown=self.stop)
        sspry_pb2_grpc.add_SspryServicer_to_server(self.service, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        check_bindable(addr)
        try:
            if tls is None:
                self.port = self.grpc.add_insecure_port(addr)
            else:
                credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
                self.port = self.grpc.add_secure_port(addr, credentials)
        except RuntimeError:  # "Failed to bind": taken since check_bindable, or TLS files grpc refuses
            self.port = 0
        if self.port == 0:
            tls_files = "" if tls is None else " with the TLS certificate and key"
            raise ServeError(f"cannot listen on {addr}: grpc could not bind it{tls_files}")
        self.addr = f"{addr.rsplit(':', 1)[0]}:{self.port}"
        self.maintenance = Maintenance(self.service)

    def start(self) -> None:
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.maintenance.start()

    def stop(self) -> None:
        """Drain and stop (idempotent; safe from a signal handler thread or an RPC)."""
        if self._stopped.is_set():
            return
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc.stop(DRAIN_SECONDS).wait()
        self.maintenance.stop()
        self.forest.close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(
    root: Path,
    addr: str,
    *,
    token: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_message_bytes: int,
    search_workers: int,
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
        )
        server.start()
    except BaseException:
        forest.close()
        raise

    def on_signal(signum, frame) -> None:
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"sspry server listening on {server.addr}", flush=True)
    server.wait()
    print("sspry server stopped", flush=True)
