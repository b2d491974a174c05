"""`sspry web`: the state directory, the listening socket (loopback unless a token is set), TLS, and
uvicorn running the app until SIGINT/SIGTERM.

The state directory holds `jobs.sqlite3` (the searches and their results) and a lock, so two web servers
never run the same jobs. Its default is `$XDG_STATE_HOME/sspry-web/<target>` (`~/.local/state/...`),
one directory per forest root or server list, so each index keeps its own history.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8080"


class WebError(Exception):
    """The web server cannot start as asked (one line for the user)."""


def default_state_dir(target: str) -> Path:
    """`$XDG_STATE_HOME/sspry-web/NAME-HASH` for a target ("root:/abs/path" or "servers:a:1,b:2")."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "sspry-web"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", target.rsplit("/", 1)[-1] if "/" in target else target)[:40]
    return base / f"{name.strip('_') or 'web'}-{hashlib.sha256(target.encode()).hexdigest()[:10]}"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT ([IPv6]:PORT); port 0 picks a free one."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not match:
        raise WebError(f"--listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise WebError(f"--listen {text!r}: port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise WebError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def check_tls(cert: Path, key: Path) -> None:
    """The TLS files checked as `sspry serve` checks them (server.app.load_tls: never a passphrase
    prompt on the terminal, a mismatch named), as a WebError."""
    from sspry.server.app import ServeError, load_tls

    try:
        load_tls(Path(cert), Path(key))
    except ServeError as exc:
        raise WebError(str(exc)) from None


def lock_state(state_dir: Path):
    """Create the state directory and hold its lock for the life of the process."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / "lock", "a+")  # noqa: SIM115 (held until the process ends)
    except OSError as exc:
        raise WebError(f"cannot use the state directory {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise WebError(f"another sspry web uses the state directory {state_dir}") from None
    return handle


def run(
    open_store: Callable,
    *,
    mode: str,
    target: str,
    listen: str,
    state_dir: Path | None,
    token: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_jobs: int,
    allow_download: bool,
    log_level: str = "warning",
) -> None:
    import uvicorn

    from sspry.web.app import WebSettings, create_app
    from sspry.web.jobs import JobStore

    host, port = parse_listen(listen)
    if not is_loopback(host) and not token:
        raise WebError(f"--listen {listen} is not a loopback address: give --token (clients send it)")
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise WebError("--tls-cert and --tls-key go together")
        check_tls(tls_cert, tls_key)
    state_dir = state_dir or default_state_dir(f"{mode}:{target}")
    lock = lock_state(state_dir)
    try:
        jobs = JobStore(state_dir / "jobs.sqlite3")
    except Exception as exc:
        raise WebError(f"cannot open {state_dir / 'jobs.sqlite3'}: {exc}") from None
    settings = WebSettings(
        target=target, mode=mode, max_jobs=max_jobs, token=token, allow_download=allow_download
    )  # type: ignore[arg-type]
    app = create_app(open_store, settings, jobs)
    sock = bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    scheme = "https" if tls_cert else "http"
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("debug", "info"),
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    print(f"sspry web listening on {scheme}://{shown}:{bound[1]} (state: {state_dir})", flush=True)
    print(f"searching {target}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        lock.close()
