"""`sspry serve`: a gRPC server process around one Forest.

Binds loopback by default, serves the standard health and reflection services beside `sspry.v1.Sspry`,
optionally TLS and a shared token, and drains cleanly on SIGINT/SIGTERM or a Shutdown call: no new calls,
the ones in flight finish, the ingest log is closed, the Forest's writer lock released.
"""

from __future__ import annotations

import signal
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
        if tls is None:
            self.port = self.grpc.add_insecure_port(addr)
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.grpc.add_secure_port(addr, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {addr}")
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
    forest = Forest.open(root, writable=True)
    tls = (tls_cert.read_bytes(), tls_key.read_bytes()) if tls_cert and tls_key else None
    try:
        server = Server(
            forest,
            addr,
            token=token,
            tls=tls,
            max_message_bytes=max_message_bytes,
            search_workers=search_workers,
        )
    except Exception:
        forest.close()
        raise
    server.start()

    def on_signal(signum, frame) -> None:
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"sspry server listening on {server.addr}", flush=True)
    server.wait()
    print("sspry server stopped", flush=True)
