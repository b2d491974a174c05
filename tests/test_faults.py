"""Faults: a full disk, rows that cannot be published, power loss. Nothing acknowledged is lost, and the
forest recovers by itself once the fault is gone. (Crashes at kill points: test_crashes.py.)"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sqlite3
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sspry import limits
from sspry.cli import main
from sspry.document import Document, path_key
from sspry.policy import POLICY_VERSION, Policy, PolicyError
from sspry.store import diskio
from sspry.store.errors import ForestError, StorageFull
from sspry.store.filenames import TEMP_PREFIX, log_name
from sspry.store.forest import Forest
from sspry.store.ingest_log import LogWriter, read_log, write_log
from sspry.store.segment import FreshPart
from tests.test_store import make_doc

DISK_FULL = (OSError, StorageFull)


@pytest.fixture(autouse=True)
def _free_disk():
    yield
    diskio.free()


def held_ids(root: Path) -> list[bytes]:
    """Every live document of the forest (a list: a document held twice shows twice)."""
    with Forest.open(root) as forest:
        return [
            view.reader.source_id(int(i))
            for view in forest.snapshot().views
            for i in range(view.reader.docs)
            if view.live[i]
        ]


@pytest.mark.parametrize("budget", [7, 40, 300, 2000])
def test_a_failed_append_strands_no_acked_row(tmp_path, budget: int) -> None:
    """Finding: an append cut short by ENOSPC left a torn frame mid-log; rows acknowledged after it
    were lost at the next open."""
    policy = Policy(shards=2)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(budget)
    docs = [make_doc(policy, rng) for _ in range(30)]
    with Forest.open(root, writable=True) as forest:
        forest.ingest(docs[:10])
        diskio.fail_after(budget)
        with pytest.raises(DISK_FULL):
            forest.ingest(docs[10:20])
        diskio.free()
        forest.ingest(docs[20:30])
    # a new process (after SIGKILL) knows only what is on disk
    with Forest.open(root, writable=True) as forest:
        forest.publish()
    held = held_ids(root)
    acked = {d.source_id for d in docs[:10] + docs[20:30]}
    assert acked <= set(held)
    assert len(held) == len(set(held))


def bytes_written(call) -> int:
    """How many bytes `call()` writes through the store's file layer."""
    diskio.fail_after(1 << 40)
    call()
    written = (1 << 40) - diskio.remaining()
    diskio.free()
    return written


@pytest.mark.parametrize("share", [0, 0.1, 0.3, 0.6, 0.9, 0.99])
def test_publish_recovers_from_a_full_disk_without_a_restart(tmp_path, share: float) -> None:
    """Finding: a publish that failed writing a segment left its directory, and every later publish
    failed on that name until a restart. The disk fills at `share` of what the publish writes."""
    policy = Policy(shards=2)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(7)
    docs = [make_doc(policy, rng) for _ in range(40)]
    with Forest.open(root, writable=True) as forest:
        forest.ingest(docs[:10])
        forest.publish()
        forest.ingest(docs[10:30])
        twin = tmp_path / "twin"
        shutil.copytree(root, twin, ignore=shutil.ignore_patterns(".lock"))
        with Forest.open(twin, writable=True) as other:
            budget = int(share * bytes_written(other.publish))
        diskio.fail_after(budget)
        with pytest.raises(DISK_FULL):
            forest.publish()
        diskio.free()
        assert forest.snapshot().documents == 10  # searches go on over the last manifest
        forest.ingest(docs[30:])
        forest.publish()
        assert forest.snapshot().documents == 40
    held = held_ids(root)
    assert sorted(held) == sorted(d.source_id for d in docs)
    for shard in (root / "trees" / "tree_0000").iterdir():  # the failed attempt left nothing behind
        assert not [p for p in shard.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_rows_with_many_field_names_publish(tmp_path) -> None:
    """Finding: 170 rows of 400 distinct module field names each, in one shard, passed validation and
    then failed every publish (field names were indexed with 16 bits)."""
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(1)
    docs = []
    for i in range(170):
        doc = make_doc(policy, rng)
        doc.fields = {f"pe.f{i}_{j}": j for j in range(400)}
        docs.append(doc)
    later = [make_doc(policy, rng) for _ in range(5)]
    with Forest.open(root, writable=True) as forest:
        forest.ingest_rows([d.to_row() for d in docs])
        forest.publish()
        forest.ingest(later)
        forest.publish()
        assert forest.snapshot().documents == 175
        view = forest.snapshot().views[0]
        present, values = view.reader.field("pe.f169_399")
        assert present.sum() == 1 and values[present][0] == 399


def _files(directory: Path, count: int, size: int = 64 << 10) -> Path:
    directory.mkdir()
    for i in range(count):
        (directory / f"f{i:03d}.bin").write_bytes(random.Random(i).randbytes(size))
    return directory


@pytest.mark.parametrize("budget", [300_000, 1_100_000])  # full in the append; full in the publish
def test_embedded_index_on_a_full_disk_says_so_in_one_line(tmp_path, budget: int) -> None:
    """Finding: `sspry local index` on a full disk ended in a traceback. Now: one line, a non-zero exit,
    and the same command once space is freed indexes the rest without logging anything twice."""
    files = _files(tmp_path / "files", 20)
    root = tmp_path / "f"
    Forest.init(root, Policy(store_path=True))
    diskio.fail_after(budget)
    result = CliRunner().invoke(main, ["local", "index", "--root", str(root), str(files)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled: no traceback
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and lines[0].endswith("No space left on device"), result.output
    diskio.free()
    logged = {row.source_id for log in (root / "ingest").iterdir() for row in read_log(log).rows}
    published = set(held_ids(root))
    again = CliRunner().invoke(main, ["local", "index", "--root", str(root), "--json", str(files)])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["inserted_documents"] == 20 - len(logged | published)  # nothing logged twice
    held = held_ids(root)
    assert len(held) == 20 == len(set(held))


class DirectoryEvents:
    """What happened to directories inside a block, in order: an entry created or renamed into one
    (keyed by the directory's inode and the entry's name: a directory built under a temporary name and
    renamed is the same inode), and fsyncs of directories."""

    def __init__(self) -> None:
        self.clock = 0
        self.created: dict[tuple[int, int, str], int] = {}  # (dev, ino of the directory, name) -> when
        self.synced: dict[tuple[int, int], int] = {}  # (dev, ino) -> the last fsync

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def create(self, path) -> None:
        path = os.fsdecode(path)
        parent = os.stat(os.path.dirname(os.path.abspath(path)))
        self.created[(parent.st_dev, parent.st_ino, os.path.basename(path))] = self._tick()

    def fsync(self, fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            self.synced[(info.st_dev, info.st_ino)] = self._tick()

    def durable(self, entry: str) -> bool:
        """Was `entry`'s directory fsynced after the entry last came to be there? (Entries this block
        did not create through `os`, SQLite's: after the block began.)"""
        parent = os.stat(os.path.dirname(entry))
        synced = self.synced.get((parent.st_dev, parent.st_ino), -1)
        return synced > self.created.get((parent.st_dev, parent.st_ino, os.path.basename(entry)), 0)


@contextlib.contextmanager
def directory_events(monkeypatch):
    """Record creations, renames and directory fsyncs made through `os` inside the block."""
    events = DirectoryEvents()
    real = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "link", "fsync")}

    def opened(path, flags, *args, **kwargs):
        fd = real["open"](path, flags, *args, **kwargs)
        if flags & os.O_CREAT:
            events.create(path)
        return fd

    def made(path, *args, **kwargs):
        real["mkdir"](path, *args, **kwargs)
        events.create(path)

    def moved(name):
        def move(source, target, *args, **kwargs):
            real[name](source, target, *args, **kwargs)
            events.create(target)

        return move

    def fsync(fd: int) -> None:
        real["fsync"](fd)
        events.fsync(fd)

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "mkdir", made)
    for name in ("rename", "replace", "link"):
        monkeypatch.setattr(os, name, moved(name))
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield events
    finally:
        monkeypatch.undo()


NOT_DURABLE = {".lock", "files.sqlite-wal", "files.sqlite-shm", "files.sqlite-journal"}  # SQLite's own


def entries(root: Path) -> set[str]:
    found = {str(root)}
    for directory, dirs, files in os.walk(root):
        found.update(os.path.join(directory, n) for n in dirs + files if n not in NOT_DURABLE)
    return found


def test_every_new_entry_is_made_durable_in_its_directory(tmp_path, monkeypatch) -> None:
    """Power loss: a file or directory created (or renamed into place) is only there after a crash if
    its directory was fsynced after the creation."""
    policy = Policy(shards=2)
    root = tmp_path / "f"
    rng = random.Random(3)
    docs = [make_doc(policy, rng) for _ in range(24)]
    forest: Forest | None = None

    def init() -> None:
        Forest.init(root, policy)

    def open_() -> None:
        nonlocal forest
        forest = Forest.open(root, writable=True)

    def set_aside() -> None:  # a row an older sspry logged, over a limit: quarantined by the publish
        old = make_doc(policy, rng)
        old.fields = {f"pe.f{i}": i for i in range(limits.MAX_FIELDS_PER_ROW + 1)}
        write_log(root / "ingest" / log_name(1000), [old.to_row()])
        assert forest.publish().quarantined == 1

    steps = [
        ("init", init),
        ("open", open_),
        ("ingest", lambda: forest.ingest(docs[:12])),
        ("publish", lambda: forest.publish()),
        ("ingest again", lambda: forest.ingest(docs[12:])),
        ("publish again", lambda: forest.publish()),
        ("delete", lambda: forest.delete([docs[0].source_id, docs[13].source_id])),
        ("compact", lambda: forest.compact(full=True)),
        ("quarantine", set_aside),
    ]
    try:
        for name, step in steps:
            before = entries(root) if root.exists() else set()
            with directory_events(monkeypatch) as events:
                step()
            for entry in sorted(entries(root) - before):
                assert events.durable(entry), f"{name}: {entry} not made durable"
    finally:
        if forest is not None:
            forest.close()


def test_reading_a_log_skips_a_corrupt_frame_and_resynchronises(tmp_path) -> None:
    policy = Policy()
    rng = random.Random(4)
    rows = [make_doc(policy, rng).to_row() for _ in range(6)]
    path = tmp_path / "log_0000000001.bin"
    writer = LogWriter(path)
    offsets = []
    for row in rows:
        offsets.append(writer.bytes)
        writer.append([row])
    writer.close()
    data = bytearray(path.read_bytes())
    data[offsets[2] + 20] ^= 0xFF  # bit rot inside the third frame's payload
    data[offsets[4] : offsets[4] + 4] = b"\x00\x00\x00\x00"  # the fifth frame's magic is gone
    data += data[offsets[1] : offsets[1] + 9]  # and a torn frame at the end
    path.write_bytes(bytes(data))
    contents = read_log(path)
    assert [r.source_id for r in contents.rows] == [rows[i].source_id for i in (0, 1, 3, 5)]
    assert [offset for offset, _ in contents.corrupt] == [offsets[2], offsets[4]]
    assert [len(span) for _, span in contents.corrupt] == [offsets[3] - offsets[2], offsets[5] - offsets[4]]
    assert contents.torn_tail == 9


def test_a_log_of_the_previous_format_is_still_read(tmp_path) -> None:
    """Format 1 logs (no header, frames `length | crc32 | payload`) are read; a torn tail is dropped."""
    policy = Policy()
    rows = [make_doc(policy, random.Random(i)).to_row() for i in range(3)]
    payloads = [row.SerializeToString() for row in rows]
    data = b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in payloads) + b"\x40\x00\x00"
    (tmp_path / "log.bin").write_bytes(data)
    contents = read_log(tmp_path / "log.bin")
    assert contents.format == 1 and contents.rows == rows and contents.torn_tail == 3


def test_corrupt_and_refused_rows_are_quarantined_and_the_rest_published(tmp_path) -> None:
    """A log can hold rows a publish cannot take: a frame that rotted, a row logged before a limit
    existed. They are set aside with a report; everything else, and everything after, is published."""
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(8)
    docs = [make_doc(policy, rng) for _ in range(6)]
    too_many = make_doc(policy, rng)
    too_many.fields = {f"pe.field_{i}": i for i in range(limits.MAX_FIELDS_PER_ROW + 1)}
    writer = LogWriter(root / "ingest" / log_name(1))  # as an older sspry, without the limit, wrote it
    starts = []
    for row in [d.to_row() for d in docs[:3]] + [too_many.to_row()] + [d.to_row() for d in docs[3:]]:
        starts.append(writer.bytes)
        writer.append([row])
    writer.close()
    log = root / "ingest" / log_name(1)
    data = bytearray(log.read_bytes())
    data[starts[1] + 30] ^= 0x01
    log.write_bytes(bytes(data))
    later = [make_doc(policy, rng) for _ in range(3)]
    with Forest.open(root, writable=True) as forest:
        result = forest.publish()
        assert (result.inserted, result.quarantined) == (5, 1)
        forest.ingest(later)
        forest.publish()
        info = forest.info()
    assert info["documents"] == 8 and info["quarantined_rows"] == 1
    assert info["quarantined_corrupt_bytes"] == starts[2] - starts[1]
    assert set(held_ids(root)) == {d.source_id for d in docs + later if d is not docs[1]}
    (entry,) = (root / "quarantine").iterdir()
    report = json.loads((entry / "report.json").read_text())
    assert report["format"] == 1
    assert report["rows"][0]["source_id"] == too_many.source_id.hex()
    assert "MAX_FIELDS_PER_ROW" in report["rows"][0]["reason"]
    assert report["corrupt"] == [{"log": log.name, "offset": starts[1], "bytes": starts[2] - starts[1]}]
    assert read_log(entry / "rows.bin").rows == [too_many.to_row()]
    assert (entry / "corrupt.bin").read_bytes() == bytes(data[starts[1] : starts[2]])


def test_a_row_that_cannot_be_built_is_quarantined_alone(tmp_path, monkeypatch) -> None:
    """Whatever the limits say, a row a segment cannot be built from must not block the others: the
    publish splits the failing group until the row fails alone, and sets it aside."""
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(9)
    docs = [make_doc(policy, rng) for _ in range(13)]
    poison = docs[7].source_id
    column = FreshPart.column

    def failing(self, name):
        if any(d.source_id == poison for d in self.docs):
            raise ValueError("cannot build this one")
        return column(self, name)

    monkeypatch.setattr(FreshPart, "column", failing)
    with Forest.open(root, writable=True) as forest:
        forest.ingest(docs)
        result = forest.publish()
        assert (result.inserted, result.quarantined) == (12, 1)
        assert forest.info()["quarantined_rows"] == 1
    assert sorted(held_ids(root)) == sorted(d.source_id for d in docs if d.source_id != poison)
    (entry,) = (root / "quarantine").iterdir()
    report = json.loads((entry / "report.json").read_text())
    assert [r["source_id"] for r in report["rows"]] == [poison.hex()]
    assert "cannot build this one" in report["rows"][0]["reason"]


def doc_with(policy: Policy, **changes) -> Document:
    doc = make_doc(policy, random.Random(5), path="/x/y")
    for name, value in changes.items():
        setattr(doc, name, value)
    return doc


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fields": {f"pe.f{i}": i for i in range(513)}}, "MAX_FIELDS_PER_ROW"),
        ({"fields": {"pe." + "a" * 200: 1}}, "MAX_FIELD_NAME_BYTES"),
        ({"fields": {"pe.bad name": 1}}, "FIELD_NAME"),
        ({"fields": {"pé.x": 1}}, "FIELD_NAME"),
        ({"path": "/" + "a" * 5000}, "MAX_PATH_BYTES"),
        ({"tier1_estimate": 10**6}, "does not fit its estimate"),
        ({"entry_bytes": b"x" * 17}, "ENTRY_BYTES"),
    ],
)
def test_every_row_limit_is_checked_at_insert_and_named(tmp_path, changes, message) -> None:
    policy = Policy(store_path=True)
    root = tmp_path / "f"
    Forest.init(root, policy)
    doc = doc_with(policy, **changes)
    if "path" in changes:
        doc.path_key = path_key(doc.path)
    with Forest.open(root, writable=True) as forest:
        with pytest.raises(PolicyError, match=message):
            forest.ingest_rows([doc.to_row()])
        with pytest.raises(PolicyError, match=message):
            forest.ingest([doc])
        assert forest.pending_bytes == 0


def test_row_bytes_are_limited(monkeypatch) -> None:
    policy = Policy()
    doc = make_doc(policy, random.Random(1))
    doc.check(policy)
    monkeypatch.setattr(limits, "MAX_ROW_BYTES", doc.row_bytes() - 1)
    with pytest.raises(PolicyError, match="MAX_ROW_BYTES"):
        doc.check(policy)


def _forest_with_a_segment_and_a_log(root: Path) -> list[Document]:
    policy = Policy(shards=1, store_path=True)
    Forest.init(root, policy)
    rng = random.Random(12)
    docs = [make_doc(policy, rng, path=f"/d/{i}") for i in range(6)]
    docs[0].fields = {"pe.machine": 332, "pe.number_of_sections": 3}
    with Forest.open(root, writable=True) as forest:
        forest.ingest(docs[:4])
        forest.publish()
        forest.ingest(docs[4:])
    return docs


@pytest.mark.parametrize("family", ["policy", "manifest", "segment", "log", "catalog"])
def test_a_forest_of_another_format_is_refused_in_one_line(tmp_path, family: str) -> None:
    root = tmp_path / "f"
    _forest_with_a_segment_and_a_log(root)
    (segment,) = (root / "trees" / "tree_0000" / "shard_000").iterdir()
    (log,) = (root / "ingest").iterdir()
    if family in ("policy", "manifest", "segment"):
        path, key = {
            "policy": (root / "sspry.json", "version"),
            "manifest": (root / "manifest.json", "format"),
            "segment": (segment / "segment.json", "format"),
        }[family]
        data = json.loads(path.read_text())
        data[key] = 7
        path.write_text(json.dumps(data))
        reads = POLICY_VERSION if family == "policy" else 1
        expected = f"{path}: {family} format 7, this sspry reads format {reads}"
    elif family == "log":
        data = bytearray(log.read_bytes())
        data[8:12] = struct.pack("<I", 7)
        log.write_bytes(bytes(data))
        expected = f"{log}: ingest log format 7, this sspry reads format 2"
    else:
        db = sqlite3.connect(root / "files.sqlite")
        db.execute("PRAGMA user_version=7")
        db.close()
        expected = f"{root / 'files.sqlite'}: file catalog format 7, this sspry reads format 1"
    with pytest.raises(ForestError) as caught:
        Forest.open(root, writable=True)
    assert str(caught.value) == expected
    result = CliRunner().invoke(main, ["local", "compact", "--root", str(root)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == f"Error: {expected}"


def test_a_forest_of_policy_format_1_is_refused_with_what_to_do(tmp_path) -> None:
    """Policy format 1 hashed grams with MurmurHash3: such a forest is refused, naming the fix."""
    root = tmp_path / "f"
    _forest_with_a_segment_and_a_log(root)
    data = json.loads((root / "sspry.json").read_text())
    data["version"] = 1
    (root / "sspry.json").write_text(json.dumps(data))
    with pytest.raises(ForestError) as caught:
        Forest.open(root)
    assert str(caught.value).startswith(f"{root / 'sspry.json'}: policy format 1, this sspry reads format 2")
    assert "index the files again" in str(caught.value)


def test_a_forest_written_before_format_versions_opens(tmp_path) -> None:
    """Files without a version (manifest, segment.json, logs without a header, field names as uint16)
    are the previous format, 1: a forest written so opens, publishes its log and searches."""
    root = tmp_path / "f"
    docs = _forest_with_a_segment_and_a_log(root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["format"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (segment,) = (root / "trees" / "tree_0000" / "shard_000").iterdir()
    meta = json.loads((segment / "segment.json").read_text())
    del meta["format"]
    (segment / "segment.json").write_text(json.dumps(meta))
    names = np.load(segment / "field_name.npy")
    np.save(segment / "field_name.npy", names.astype(np.uint16))
    (log,) = (root / "ingest").iterdir()
    payloads = [row.SerializeToString() for row in read_log(log).rows]
    log.write_bytes(b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in payloads))
    with Forest.open(root, writable=True) as forest:
        assert forest.publish().inserted == 2
        assert forest.snapshot().documents == 6
        view = next(v for v in forest.snapshot().views if v.reader.find([docs[0].source_id])[0] >= 0)
        present, values = view.reader.field("pe.number_of_sections")
        assert values[present].tolist() == [3]
    assert json.loads((root / "manifest.json").read_text())["format"] == 1


def test_a_file_over_a_limit_is_skipped_not_a_failed_run(tmp_path) -> None:
    """A file whose document breaks a limit (here: a path that is not UTF-8, in a forest that stores
    paths) is reported as skipped; the run indexes the others."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "plain.bin").write_bytes(random.Random(1).randbytes(3000))
    with open(os.path.join(os.fsencode(files), b"\xff\xfe.bin"), "wb") as out:
        out.write(random.Random(2).randbytes(3000))
    root = tmp_path / "f"
    Forest.init(root, Policy(store_path=True))
    result = CliRunner().invoke(main, ["local", "index", "--root", str(root), "--json", str(files)])
    assert result.exit_code == 0, result.output
    assert "not valid UTF-8" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["inserted_documents"], summary["skipped_files"]) == (1, 1)


def test_a_swap_whose_directory_fsync_fails_still_counts(tmp_path, monkeypatch) -> None:
    """The manifest was renamed into place but fsyncing its directory failed (EIO): the publish raises,
    yet the new manifest is the current one, so its segments must stay and its documents be live."""
    policy = Policy(shards=1)
    root = tmp_path / "f"
    Forest.init(root, policy)
    rng = random.Random(6)
    docs = [make_doc(policy, rng) for _ in range(5)]
    real = diskio.fsync_path

    def failing(path: Path) -> None:
        if Path(path) == root:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    with Forest.open(root, writable=True) as forest:
        forest.ingest(docs)
        monkeypatch.setattr(diskio, "fsync_path", failing)
        with pytest.raises(OSError, match="Input/output"):
            forest.publish()
        monkeypatch.undo()
        assert forest.snapshot().documents == 5
        assert forest.delete([docs[0].source_id]) == [True]
        assert forest.ingest([docs[0]]).inserted == 1  # not mistaken for a document still pending
        forest.publish()
    assert sorted(held_ids(root)) == sorted(d.source_id for d in docs)
