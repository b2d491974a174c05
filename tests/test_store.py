"""The Forest store: segments hold exactly the blooms written, and every write path keeps them."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from sspry.bloom import bloom_positions, ladder
from sspry.policy import BLOCK_BITS, Policy, PolicyError
from sspry.query import bitmaps
from sspry.query.gather import read_leaves
from sspry.store.files import PathsOf
from sspry.store.forest import Forest, ForestError, IngestResult
from sspry.store.ingest_log import read_log
from sspry.store.segment import FreshPart, SegmentPart, SegmentReader, build_segment
from sspry.synthetic import random_document


def unpacked(rows: np.ndarray, docs: int) -> np.ndarray:
    """Packed gram rows (grams x words) as booleans (grams x docs)."""
    return np.array([bitmaps.unpack(row, docs) for row in rows]).reshape(len(rows), docs)


def make_doc(
    policy: Policy, rng: random.Random, blocks: tuple[int, int] | None = None, path: str | None = None
):
    """A document with random blooms drawn from the policy's size classes."""
    return random_document(policy, rng, blocks, path)


def stored_bloom(reader: SegmentReader, doc: int, tier: int) -> bytes:
    """Read one document's whole bloom back out of the bit-sliced class it lives in."""
    blocks = int(reader.doc_blocks(tier)[doc])
    index = reader.class_index(tier, blocks)
    column = int(reader.class_columns(tier, np.array([doc]))[0])
    bits = reader.row_bits(tier, index, 0, blocks * BLOCK_BITS)[:, column]
    return np.packbits(bits, bitorder="little").tobytes()


@pytest.mark.parametrize("count", [1, 7, 8, 9, 23, 64])
def test_segment_round_trip(tmp_path, count: int) -> None:
    policy = Policy(store_path=True, id_source="md5")
    rng = random.Random(count)
    # few classes, so classes hold several documents and both the sliced part and the tail are used
    docs = [
        make_doc(policy, rng, (rng.choice([1, 2]), rng.choice([2, 3])), path=f"/p/{i}") for i in range(count)
    ]
    build_segment(tmp_path / "seg", [FreshPart(docs, policy)], policy)
    reader = SegmentReader(tmp_path / "seg")
    assert reader.docs == count
    by_id = {d.source_id: d for d in docs}
    for i in range(count):
        doc = by_id[reader.source_id(i)]
        assert stored_bloom(reader, i, 1) == doc.tier1.tobytes()
        assert stored_bloom(reader, i, 2) == doc.tier2.tobytes()
        assert int(reader.filesize[i]) == doc.filesize
        assert float(reader.entropy[i]) == doc.entropy
        assert reader.prefix[i, : reader.prefix_len[i]].tobytes() == doc.prefix
    # the query-side read of gram leaves agrees with testing each stored bloom directly
    for tier in (1, 2):
        k = rng.choice([1, 2, 3])
        h2 = np.array([rng.getrandbits(64) for _ in range(40)], dtype=np.uint64)
        # half the hashes are grams of the first document, so leaves are not all False
        doc0 = by_id[reader.source_id(0)].bloom(tier)
        blocks0 = len(doc0) * 8 // BLOCK_BITS
        for compiled in (True, False):
            leaves = unpacked(read_leaves(reader, tier, h2, k, None, compiled=compiled), reader.docs)
            for i in range(reader.docs):
                bloom = by_id[reader.source_id(i)].bloom(tier)
                positions = bloom_positions(h2, len(bloom) * 8 // BLOCK_BITS, k)
                expect = ((bloom[positions >> 3] >> (positions & 7).astype(np.uint8)) & 1).all(axis=1)
                assert np.array_equal(leaves[:, i], expect), (tier, i, blocks0, compiled)
    found = reader.find([d.source_id for d in docs] + [b"\x00" * 16])
    assert [reader.source_id(int(i)) for i in found[:-1]] == [d.source_id for d in docs]
    assert found[-1] == -1


@pytest.mark.parametrize("seed", range(3))
def test_numpy_gather_reads_what_the_compiled_one_reads(tmp_path, seed: int) -> None:
    """The two gathers of query/gather.py agree on a segment of random blooms in several classes per
    tier (Tier 2 classes are not contiguous in document order), with sliced parts and tails of 1 to 7
    documents, reading every document or only some (then exactly those: the others read 0)."""
    policy = Policy()
    rng = random.Random(seed)
    sizes = [int(s) for s in ladder(policy.ladder_steps)]
    counts = [1, 3, 7, 8, 9, 15, 21, 36]  # documents per Tier 1 class
    docs = [
        make_doc(policy, rng, (sizes[c], sizes[rng.randrange(5)]))
        for c, count in enumerate(counts)
        for _ in range(count)
    ]
    rng.shuffle(docs)
    build_segment(tmp_path / "seg", [FreshPart(docs, policy)], policy)
    reader = SegmentReader(tmp_path / "seg")
    assert len(reader.classes[1]) == len(counts) and len(reader.classes[2]) == 5
    for tier in (1, 2):
        for k in (1, 2, 4):
            h2 = np.array([rng.getrandbits(64) for _ in range(50)], dtype=np.uint64)
            every = read_leaves(reader, tier, h2, k, None, compiled=True)
            for documents in (None, np.array([rng.random() < 0.2 for _ in range(reader.docs)])):
                keep = None if documents is None else bitmaps.pack(documents)
                compiled = read_leaves(reader, tier, h2, k, keep, compiled=True)
                bits = unpacked(compiled, reader.docs)
                assert 0 < bits.sum() < bits.size
                assert np.array_equal(read_leaves(reader, tier, h2, k, keep, compiled=False), compiled)
                if documents is not None:
                    assert np.array_equal(bits, unpacked(every, reader.docs) & documents)
                past = np.unpackbits(compiled.view(np.uint8), axis=1, bitorder="little")[:, reader.docs :]
                assert not past.any()


def test_merging_segments_keeps_survivors_exactly(tmp_path) -> None:
    policy = Policy(store_path=True)
    rng = random.Random(3)
    groups = [
        [make_doc(policy, rng, (rng.choice([1, 2]), 2), path=f"/g{g}/{i}") for i in range(n)]
        for g, n in enumerate((5, 13, 9))
    ]
    readers = []
    for g, docs in enumerate(groups):
        build_segment(tmp_path / f"s{g}", [FreshPart(docs, policy)], policy)
        readers.append(SegmentReader(tmp_path / f"s{g}"))
    keeps = [rng.getrandbits(r.docs) for r in readers]
    masks = [
        np.array([(k >> i) & 1 for i in range(r.docs)], dtype=bool)
        for k, r in zip(keeps, readers, strict=True)
    ]
    build_segment(
        tmp_path / "merged", [SegmentPart(r, m) for r, m in zip(readers, masks, strict=True)], policy
    )
    merged = SegmentReader(tmp_path / "merged")
    expected = {}
    for reader, mask in zip(readers, masks, strict=True):
        for i in np.flatnonzero(mask):
            expected[reader.source_id(int(i))] = (
                stored_bloom(reader, int(i), 1),
                stored_bloom(reader, int(i), 2),
            )
    assert merged.docs == len(expected)
    for i in range(merged.docs):
        want = expected[merged.source_id(i)]
        assert (stored_bloom(merged, i, 1), stored_bloom(merged, i, 2)) == want


def test_init_validates_and_is_idempotent(tmp_path) -> None:
    root = tmp_path / "forest"
    Forest.init(root, Policy())
    Forest.init(root, Policy())  # same policy: no-op
    with pytest.raises(PolicyError, match="different policy"):
        Forest.init(root, Policy(gram_sizes=(4, 5)))
    Forest.init(root, Policy(gram_sizes=(4, 5)), force=True)
    with Forest.open(root) as forest:
        assert forest.policy.gram_sizes == (4, 5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(PolicyError, match="not an empty directory"):
        Forest.init(tmp_path / "other", Policy())
    with pytest.raises(PolicyError, match="not an sspry forest"):
        Forest.init(tmp_path / "other", Policy(), force=True)
    assert (tmp_path / "other" / "keep.txt").exists()
    with pytest.raises(ForestError, match="sspry init"):
        Forest.open(tmp_path / "nothing")


def test_one_writer_at_a_time(tmp_path) -> None:
    Forest.init(tmp_path / "f", Policy())
    with (
        Forest.open(tmp_path / "f", writable=True),
        pytest.raises(ForestError, match="another sspry process"),
    ):
        Forest.open(tmp_path / "f", writable=True)
    with Forest.open(tmp_path / "f", writable=True):
        pass  # released on close


def test_publish_dedups_deletes_and_compacts(tmp_path) -> None:
    policy = Policy(shards=2, store_path=True, tree_docs=25)
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(11)
    docs = [make_doc(policy, rng, path=f"/d/{i}") for i in range(60)]
    with Forest.open(tmp_path / "f", writable=True) as forest:
        assert forest.ingest(docs[:30]) == IngestResult(30, 0)
        assert forest.ingest(docs[:10]) == IngestResult(0, 10)  # waiting in the log: duplicates already
        first = forest.publish()
        assert (first.inserted, first.duplicates) == (30, 0)
        assert forest.ingest(docs[25:60] + docs[59:60]) == IngestResult(30, 6)
        assert forest.publish().inserted == 30
        info = forest.info()
        assert info["documents"] == 60
        assert info["trees"] == 3  # 25 + 25 + 10: trees roll over at tree_docs
        assert forest.delete([docs[0].source_id, docs[0].source_id, b"\x01" * 32]) == [True, True, False]
        assert forest.delete([docs[0].source_id]) == [False]
        assert forest.paths_of([docs[0].source_id, docs[5].source_id]) == {
            # a deleted document's paths are forgotten; a path comes with its stamp when indexed
            docs[5].source_id: PathsOf(("/d/5",), 1, ((docs[5].filesize, docs[5].mtime_ns),))
        }
        segments_before = info["segments"]
        forest.ingest([docs[0]])  # a deleted document can be indexed again
        assert forest.publish().inserted == 1
        result = forest.compact(full=True)
        assert result.purged_docs == 1
        info = forest.info()
        assert info["documents"] == 60 and info["deleted"] == 0
        assert info["segments"] <= segments_before
        ids = set()
        for view in forest.snapshot().views:
            ids |= {view.reader.source_id(i) for i in range(view.reader.docs)}
        assert ids == {d.source_id for d in docs}


def test_a_full_compaction_can_go_one_shard_at_a_time(tmp_path) -> None:
    """`shard_limit` (a server settling) rewrites that many shards per call, until each has one segment."""
    policy = Policy(shards=2)
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(3)
    docs = [make_doc(policy, rng) for _ in range(40)]
    with Forest.open(tmp_path / "f", writable=True) as forest:
        for part in (docs[:20], docs[20:]):  # two publishes: two segments in each shard
            forest.ingest(part)
            forest.publish()
        assert forest.info()["segments"] == 4
        assert forest.compact(full=True, shard_limit=1).rewritten == 2
        assert forest.info()["segments"] == 3
        assert forest.compact(full=True, shard_limit=1).rewritten == 2
        assert forest.info()["segments"] == 2
        assert forest.compact(full=True, shard_limit=1).rewritten == 0
        assert forest.info()["documents"] == 40


def test_ingest_rejects_malformed_rows_and_writes_nothing(tmp_path) -> None:
    policy = Policy()
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(5)
    good = make_doc(policy, rng).to_row()
    short_id = make_doc(policy, rng).to_row()
    short_id.source_id = b"\x00" * 16
    bad_bloom = make_doc(policy, rng).to_row()
    bad_bloom.tier2.bits = b"\x00" * 100
    with Forest.open(tmp_path / "f", writable=True) as forest:
        for row, message in ((short_id, "source id of 16 bytes"), (bad_bloom, "not a size class")):
            with pytest.raises(PolicyError, match=message):
                forest.ingest_rows([good, row])
        assert forest.pending_bytes == 0
        assert forest.publish().inserted == 0


def test_torn_log_tail_is_dropped_and_the_rest_published(tmp_path) -> None:
    policy = Policy()
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(9)
    docs = [make_doc(policy, rng) for _ in range(5)]
    with Forest.open(tmp_path / "f", writable=True) as forest:
        forest.ingest(docs)
    log = next((tmp_path / "f" / "ingest").iterdir())
    with open(log, "ab") as handle:  # a crash in the middle of the next append
        handle.write(b"\x40\x00\x00\x00\x12\x34")
    contents = read_log(log)
    assert len(contents.rows) == 5 and contents.torn_tail == 6 and not contents.corrupt
    with Forest.open(tmp_path / "f", writable=True) as forest:
        result = forest.publish()
        assert (result.inserted, result.dropped_bytes) == (5, 6)
        assert not list((tmp_path / "f" / "ingest").iterdir())


def test_interrupted_publish_leaves_no_garbage(tmp_path, monkeypatch) -> None:
    policy = Policy(shards=1)
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(2)
    docs = [make_doc(policy, rng) for _ in range(4)]
    shard = tmp_path / "f" / "trees" / "tree_0000" / "shard_000"
    with Forest.open(tmp_path / "f", writable=True) as forest:
        forest.ingest(docs)
        monkeypatch.setattr(
            "sspry.store.forest.write_manifest", lambda *a: (_ for _ in ()).throw(OSError("disk"))
        )
        with pytest.raises(OSError):
            forest.publish()
        monkeypatch.undo()
        assert not any(shard.iterdir())  # the failed publish removed the segment it had built ...
        assert forest.publish().inserted == 4  # ... and the same forest publishes: the log held every row
    # what a writer killed mid-build leaves (a segment under its temporary name, an unreferenced one) is
    # removed by the next writer to open the forest
    leftovers = [shard / ".tmp-seg_0000000007-0123456789ab", shard / "seg_0000000008"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "ids.npy").write_bytes(b"partial")
    with Forest.open(tmp_path / "f", writable=True) as forest:
        assert not any(p.exists() for p in leftovers)
        assert forest.snapshot().documents == 4


def test_reader_sees_a_consistent_snapshot_while_a_writer_works(tmp_path) -> None:
    policy = Policy(shards=1)
    Forest.init(tmp_path / "f", policy)
    rng = random.Random(4)
    with Forest.open(tmp_path / "f", writable=True) as writer, Forest.open(tmp_path / "f") as reader:
        for round_ in range(6):
            writer.ingest([make_doc(policy, rng) for _ in range(3)])
            writer.publish()
            snapshot = reader.snapshot()
            assert snapshot.documents == 3 * (round_ + 1)
            writer.compact(full=True)  # removes the segments the reader's snapshot has open
            assert sum(int(v.live.sum()) for v in snapshot.views) == snapshot.documents
            assert reader.snapshot().documents == snapshot.documents
            # an unchanged manifest is not read again: the reader keeps its snapshot
            assert reader.snapshot() is reader.snapshot()
        assert len(os.listdir(tmp_path / "f" / "trees" / "tree_0000" / "shard_000")) == 1
        gone = next(iter(writer.snapshot().views)).reader.source_id(0)
        assert writer.delete([gone]) == [True]  # a tombstone, and a new manifest naming it
        assert reader.snapshot().documents == 17
