"""The `sspry web` command (added to the `sspry` group by sspry/cli.py). Imports nothing heavy until run."""

from __future__ import annotations

from pathlib import Path

import click

from sspry.web.serve import DEFAULT_LISTEN


@click.command()
@click.option(
    "--root",
    default=None,
    envvar="SSPRY_ROOT",
    show_envvar=True,
    type=click.Path(file_okay=False),
    help="Search the Forest at this root, in this process.",
)
@click.option("--addr", default=None, help="Search these servers instead (HOST:PORT, comma separated).")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to serve the page and API on (port 0: a free one, printed). Not loopback: needs --token.",
)
@click.option(
    "--token",
    envvar="SSPRY_WEB_TOKEN",
    show_envvar=True,
    default=None,
    help="Require 'Authorization: Bearer TOKEN' on every API call (the page asks for it).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="TLS private key (PEM).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the searches and their results are kept (SQLite)  "
    "[default: $XDG_STATE_HOME or ~/.local/state, /sspry-web/<root or servers>]",
)
@click.option(
    "--max-jobs", default=2, show_default=True, type=click.IntRange(1, 64), help="Searches run at once."
)
@click.option(
    "--allow-download",
    is_flag=True,
    help="Let API users download indexed files (read from their stored paths, checked against their ID).",
)
@click.option(
    "--server-token",
    envvar="SSPRY_TOKEN",
    show_envvar=True,
    default=None,
    help="With --addr: the servers' shared token.",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, exists=True),
    help="With --addr: CA certificate (PEM) of the servers' TLS.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="With --addr: seconds per call.",
)
@click.option(
    "--ignore-offline", is_flag=True, help="With --addr: search the servers that answer, naming the others."
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="What the web server logs on stderr (info: every request).",
)
def web(
    root,
    addr,
    listen,
    token,
    tls_cert,
    tls_key,
    state_dir,
    max_jobs,
    allow_download,
    server_token,
    tls_ca,
    timeout,
    ignore_offline,
    log_level,
):
    """Serve a page and a REST API (described at /openapi.json) to search a Forest (--root) or servers
    (--addr) with YARA rules, follow the jobs and browse, export and download the matches. Searches and
    their results are kept in SQLite in --state-dir; a restart keeps them. Stop with SIGINT/SIGTERM."""
    from sspry.cli import InputError
    from sspry.web.serve import WebError, run

    if (root is None) == (addr is None):
        raise click.UsageError("give --root DIR (a local forest) or --addr HOST:PORT[,HOST:PORT] (servers)")
    if root is not None:
        from sspry.database import Database
        from sspry.policy import PolicyError
        from sspry.store.forest import ForestError

        root = str(Path(root).resolve())
        try:
            Database.open(root).close()
        except ForestError as exc:
            raise InputError(str(exc)) from exc
        except PolicyError as exc:
            raise InputError(f"{root}: {exc}") from exc

        def open_store():
            return Database.open(root)

        mode, target = "root", root
    else:
        from sspry.client.cluster import connect
        from sspry.client.connection import parse_addrs

        try:
            addrs = parse_addrs(addr)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        ca = Path(tls_ca).read_bytes() if tls_ca else None

        def open_store():
            return connect(
                addrs, token=server_token, tls_ca=ca, timeout=timeout, ignore_offline=ignore_offline
            )

        mode, target = "servers", ",".join(addrs)
    try:
        run(
            open_store,
            mode=mode,
            target=target,
            listen=listen,
            state_dir=Path(state_dir) if state_dir else None,
            token=token,
            tls_cert=Path(tls_cert) if tls_cert else None,
            tls_key=Path(tls_key) if tls_key else None,
            max_jobs=max_jobs,
            allow_download=allow_download,
            log_level=log_level,
        )
    except WebError as exc:
        raise InputError(str(exc)) from exc
