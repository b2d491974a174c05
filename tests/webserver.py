"""Helpers of the `sspry web` tests: a small forest of real files and a real `sspry web` process on a free
loopback port, talked to over HTTP."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import sspry
from tests.conftest import system_binaries

START_TIMEOUT = 60
TOKEN_LINE = "GNU coreutils"
PLANTED = b"MZ\x90\x00 planted-marker: connect to evil-c2.example and run payload-7f3a \x00" * 3


def build_forest(base: Path, binaries: int = 12) -> tuple[Path, Path]:
    """(the forest root, the corpus): copies of real executables and two planted files with one content."""
    corpus = base / "corpus"
    corpus.mkdir(parents=True)
    for path in system_binaries(binaries):
        shutil.copyfile(path, corpus / path.name)
    (corpus / "dropper.bin").write_bytes(PLANTED)
    (corpus / "copy-of-dropper.bin").write_bytes(PLANTED)
    (corpus / "notes.txt").write_text("nothing to see here\n")
    root = base / "forest"
    with sspry.Database.create(root, store_path=True, shards=2) as db:
        summary = db.index([str(corpus)])
    assert summary.inserted_documents >= binaries, summary.counts()
    return root, corpus


@dataclass
class Web:
    process: subprocess.Popen
    url: str
    state_dir: Path
    token: str | None = None
    context: ssl.SSLContext | None = None  # https: trusts the test's certificate

    def request(self, method: str, path: str, body=None, token: str | None = ...) -> tuple[int, object, dict]:
        """(status, JSON or bytes, headers) of one call."""
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        token = self.token if token is ... else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        call = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=60, context=self.context) as response:
                status, raw, got = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            status, raw, got = exc.code, exc.read(), dict(exc.headers)
        if got.get("content-type", "").startswith("application/json"):
            return status, json.loads(raw), got
        return status, raw, got

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw):
        return self.request("POST", path, body, **kw)

    def search(self, rule: str, **options) -> str:
        status, body, _ = self.post("/api/searches", {"rule": rule, **options})
        assert status == 201, body
        return body["id"]

    def wait(self, job_id: str, timeout: float = 60, until=("done", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, body, _ = self.get(f"/api/searches/{job_id}")
            assert status == 200, body
            if body["status"] in until:
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_web(*args: str, state_dir: Path, token: str | None = None, ca: Path | None = None) -> Web:
    """`sspry web ARGS --listen 127.0.0.1:0 --state-dir STATE` started and ready (`ca`: the certificate
    to trust when it serves https)."""
    command = [sys.executable, "-m", "sspry", "web", *args, "--listen", "127.0.0.1:0"]
    command += ["--state-dir", str(state_dir)]
    if token:
        command += ["--token", token]
    env = {k: v for k, v in os.environ.items() if k not in {"SSPRY_WEB_TOKEN", "SSPRY_ROOT"}}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    match = re.search(r"sspry web listening on (\S+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"sspry web did not start: {line!r} {process.communicate(timeout=30)}")
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    web = Web(process, match.group(1), state_dir, token, context)
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # the socket listens before the app has started: wait for an answer
        try:
            if web.get("/openapi.json")[0] == 200:
                return web
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            web.stop()
            raise AssertionError(f"sspry web does not answer: {process.communicate(timeout=30)}")
        time.sleep(0.1)
