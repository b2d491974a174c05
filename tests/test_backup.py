"""`sspry local backup`: a consistent copy of a forest that is being written."""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from sspry.cli import main
from sspry.policy import Policy
from sspry.store.backup import _Copier, backup
from sspry.store.forest import Forest
from tests.test_faults import directory_events, entries
from tests.test_store import make_doc


def live_ids(root: Path) -> Counter:
    with Forest.open(root) as forest:
        return Counter(
            v.reader.source_id(int(i))
            for v in forest.snapshot().views
            for i in range(v.reader.docs)
            if v.live[i]
        )


def test_backup_of_a_forest_being_written_is_consistent(tmp_path) -> None:
    """Everything acknowledged before the backup started is in the copy, exactly once, deletes included;
    nothing is there that was never acknowledged; the writer never waits for the backup."""
    policy = Policy(shards=2, store_path=True)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(1)
    published = [make_doc(policy, rng, path=f"/a/{i}") for i in range(30)]
    logged = [make_doc(policy, rng, path=f"/b/{i}") for i in range(10)]
    stop = threading.Event()
    acked: list[bytes] = []
    failures: list[BaseException] = []
    with Forest.open(root, writable=True) as forest:
        forest.ingest(published)
        forest.publish()
        forest.delete([published[0].source_id])
        forest.ingest(logged)  # acknowledged, waiting in the log

        def write() -> None:  # a writer that publishes, compacts and deletes all along
            writer_rng = random.Random(2)
            round_ = 0
            try:
                while not stop.is_set():
                    docs = [make_doc(policy, writer_rng, path=f"/c/{round_}/{i}") for i in range(4)]
                    forest.ingest(docs)
                    acked.extend(d.source_id for d in docs)
                    if round_ % 2:
                        forest.publish()
                    forest.compact(full=round_ % 3 == 0)
                    round_ += 1
            except BaseException as exc:
                failures.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        copies = []
        try:
            for number in range(3):
                copies.append((tmp_path / f"copy{number}", backup(root, tmp_path / f"copy{number}")))
        finally:
            stop.set()
            writer.join()
    assert not failures
    everything = {d.source_id for d in published + logged} | set(acked)
    for copy, result in copies:
        with Forest.open(copy, writable=True) as restored:
            restored.publish()
            paths = restored.paths_of([d.source_id for d in published])
        found = live_ids(copy)
        assert max(found.values()) == 1
        assert {d.source_id for d in published[1:] + logged} <= set(found)
        assert published[0].source_id not in found
        assert set(found) <= everything
        assert paths[published[5].source_id].paths == ("/a/5",)
        assert result.documents <= len(found)


def test_backup_command_links_or_copies_and_refuses_a_used_destination(tmp_path, monkeypatch) -> None:
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(3)
    with Forest.open(root, writable=True) as forest:
        forest.ingest([make_doc(policy, rng) for _ in range(5)])
        forest.publish()
        forest.ingest([make_doc(policy, rng) for _ in range(2)])
    linked = CliRunner().invoke(main, ["local", "backup", "--root", str(root), "--json", str(tmp_path / "a")])
    assert linked.exit_code == 0, linked.output
    summary = json.loads(linked.output)
    assert (summary["documents"], summary["segments"], summary["unpublished_logs"]) == (5, 1, 1)
    assert summary["linked_files"] > 0
    (segment,) = (tmp_path / "a" / "trees" / "tree_0000" / "shard_000").iterdir()
    assert os.stat(segment / "blooms.bin").st_nlink == 2  # immutable: shared with the forest
    with directory_events(monkeypatch) as events:
        copied = CliRunner().invoke(
            main, ["local", "backup", "--root", str(root), "--copy", str(tmp_path / "b")]
        )
    assert copied.exit_code == 0, copied.output
    assert "linked_files: 0" in copied.output
    for entry in sorted(entries(tmp_path / "b")):  # a power loss keeps it all
        assert events.durable(entry), entry
    info = CliRunner().invoke(main, ["local", "info", "--root", str(tmp_path / "b")])
    assert json.loads(info.output)["documents"] == 5
    used = CliRunner().invoke(main, ["local", "backup", "--root", str(root), str(tmp_path / "a")])
    assert used.exit_code == 2 and "not empty" in used.output


def test_a_compaction_under_the_backup_makes_it_read_the_manifest_again(tmp_path, monkeypatch) -> None:
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(4)
    docs = [make_doc(policy, rng) for _ in range(12)]
    with Forest.open(root, writable=True) as forest:
        for start in (0, 4, 8):
            forest.ingest(docs[start : start + 4])
            forest.publish()
        tree = _Copier.tree
        compacted = []

        def compact_first(self, source, target):  # the writer merges the segments just before the link
            if not compacted:
                compacted.append(forest.compact(full=True))
            return tree(self, source, target)

        monkeypatch.setattr(_Copier, "tree", compact_first)
        result = backup(root, tmp_path / "copy")
    assert compacted[0].rewritten == 3
    assert result.manifest_reads == 2 and result.segments == 1
    assert set(live_ids(tmp_path / "copy")) == {d.source_id for d in docs}
