"""Interrupted indexing keeps its work: real `sspry` processes, real signals, a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sspry.policy import Policy
from sspry.store.forest import Forest
from sspry.store.ingest_log import read_log
from tests.conftest import settle
from tests.test_server import ServerProcess

FILES = 600
FILE_BYTES = 96 << 10  # random bytes extract slowest: the run lasts seconds, long enough to interrupt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("interrupt") / "files"
    directory.mkdir()
    for i in range(FILES):
        (directory / f"f{i:04d}.bin").write_bytes(os.urandom(FILE_BYTES))
    return settle(directory)


def sspry(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sspry", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def summary(stdout: str) -> dict:
    return json.loads(stdout)


def logged(root: Path) -> bool:
    """Some batch is durable in the ingest log (or already published)."""
    ingest = root / "ingest"
    return any(ingest.iterdir()) or any((root / "trees").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_local_index_interrupted_keeps_its_documents(tmp_path, corpus, sig) -> None:
    root = tmp_path / "forest"
    Forest.init(root, Policy(store_path=True))
    run = sspry("local", "index", "--root", str(root), "--json", "--workers", "1", str(corpus))
    wait_for(lambda: logged(root))
    run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "interrupted" in err
    first = summary(out)
    assert first["interrupted"] is True
    assert 0 < first["inserted_documents"] < FILES
    with Forest.open(root) as forest:
        assert forest.snapshot().documents == first["inserted_documents"]  # published, searchable
    # the same command again reads only what it had not indexed
    second = sspry("local", "index", "--root", str(root), "--json", str(corpus))
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    again = summary(out)
    assert again["already_indexed_files"] == first["submitted_documents"]
    assert again["submitted_documents"] == FILES - first["submitted_documents"]
    with Forest.open(root) as forest:
        assert forest.snapshot().documents == FILES


def test_a_second_interrupt_exits_at_once_and_loses_nothing_acknowledged(tmp_path, corpus) -> None:
    root = tmp_path / "forest"
    Forest.init(root, Policy())
    run = sspry("local", "index", "--root", str(root), "--workers", "1", str(corpus))
    wait_for(lambda: any(read_log(log).rows for log in (root / "ingest").iterdir()))  # a batch acknowledged
    run.send_signal(signal.SIGINT)
    run.send_signal(signal.SIGTERM)  # two of one kind would be merged into one delivery
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "exiting now" in err
    with Forest.open(root) as forest:
        published = forest.snapshot().documents
    logged_rows = sum(len(read_log(log).rows) for log in (root / "ingest").iterdir())
    assert published + logged_rows > 0
    with Forest.open(root, writable=True) as forest:  # every acknowledged row is published
        forest.publish()
        assert forest.snapshot().documents == published + logged_rows


def test_remote_index_interrupted_reports_what_the_server_holds(tmp_path, corpus) -> None:
    root = tmp_path / "served"
    Forest.init(root, Policy(store_path=True, shards=2))
    server = ServerProcess(root)
    try:
        run = sspry("index", "--addr", server.addr, "--json", "--workers", "1", str(corpus))

        def held() -> int:
            info = subprocess.run(
                [sys.executable, "-m", "sspry", "info", "--addr", server.addr],
                capture_output=True,
                text=True,
                check=True,
            )
            data = json.loads(info.stdout)
            return data["documents"] + data["pending_log_bytes"]

        wait_for(lambda: held() > 0)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 130, err
        first = summary(out)
        assert first["interrupted"] is True and 0 < first["inserted_documents"] < FILES
        info = json.loads(
            subprocess.run(
                [sys.executable, "-m", "sspry", "info", "--addr", server.addr],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["documents"] == first["inserted_documents"] == first["servers"][server.addr]["inserted"]
        second = sspry("index", "--addr", server.addr, "--json", str(corpus))
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err
        again = summary(out)
        assert again["already_indexed_files"] == first["submitted_documents"]
        assert again["inserted_documents"] == FILES - first["inserted_documents"]
    finally:
        assert server.stop() == 0
