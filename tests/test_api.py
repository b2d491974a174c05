"""The library face: docs/api.md runs as written, `sspry` exports what it says, and the same rule through
a Database and through a server holding the same files gives the same candidates."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import sspry
from tests.test_server import ServerProcess

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_document_runs_as_written(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(DOCS), "exec"), namespace)
    printed = out.getvalue().splitlines()
    assert printed[0] == "2 1"  # the first example's own comment
    assert "unsearchable string-unanchored" in printed
    assert "path-removed 1" in printed
    assert "planning: 1 rule" in printed and "verifying: 1 file" in printed


def test_exports() -> None:
    for name in sspry.__all__:
        assert getattr(sspry, name) is not None
    assert "Database" in dir(sspry) and "connect" in sspry.__all__


def test_database_and_servers_give_the_same_candidates(indexed_corpus, tmp_path) -> None:
    served = tmp_path / "served"
    with sspry.Database.open(indexed_corpus.root) as db:
        policy = db.policy
        local = db.search(path=str(indexed_corpus.rules))
    sspry.Database.create(served, **{f: getattr(policy, f) for f in ("store_path", "shards")}).close()
    server = ServerProcess(served)
    try:
        with sspry.connect(server.addr) as servers:
            servers.index([str(f) for f in indexed_corpus.files])
            remote = servers.search(path=str(indexed_corpus.rules))
            assert servers.check(path=str(indexed_corpus.rules))[0].status
    finally:
        assert server.stop() == 0
    assert local.documents == remote.documents
    assert any(r.notes for r in local.rules)  # plan notes reach the results
    assert [r.name for r in local.rules] == [r.name for r in remote.rules]
    for mine, theirs in zip(local.rules, remote.rules, strict=True):
        assert {c.source_id for c in mine.candidates} == {c.source_id for c in theirs.candidates}, mine.name
        assert {c.source_id: c.paths for c in mine.candidates} == {
            c.source_id: c.paths for c in theirs.candidates
        }
