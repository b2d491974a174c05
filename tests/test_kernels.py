"""The compiled kernels and the extractor against slow reference implementations."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from datasketch.hyperloglog import HyperLogLogPlusPlus

from sspry import bloom
from sspry.features import extract, kernels, sizing
from sspry.policy import GRAM_PAIRS, Policy
from tests import reference

PINNED = {b"abc": 0x22C9C8BE9172F1CE, b"MZ\x90\x00": 0xF2DC38720D2C3C60}


def _samples() -> dict[str, bytes]:
    rng = random.Random(7)
    text = b"The quick brown fox jumps over the lazy dog. " * 40
    return {
        "empty": b"",
        "one": b"A",
        "short": b"abcdefg",
        "random": bytes(rng.randrange(256) for _ in range(5000)),
        "text": text,
        "zeros": b"\x00" * 3000 + b"MZ" + b"\x00" * 3000,
        "ff-runs": b"\xff" * 64 + b"x" + b"\xff" * 64,  # an all-0xFF 8-gram must not look like "no gram yet"
        "mixed": text[:500] + bytes(rng.randrange(256) for _ in range(700)) + b"\x00" * 100,
        "capitals": b"GetProcAddress LoadLibraryA CreateFileW \xc1\xdaZ@[`{" * 5,
    }


def test_compiled_probes_equal_the_numpy_reference() -> None:
    """The one probe formula (sspry/bloom.py), as the kernels compile it and as numpy computes it, for
    every probe count the fp range allows and bloom sizes across the ladder up to its largest class."""
    rng = np.random.default_rng(5)
    h2 = np.concatenate([rng.integers(0, 2**64, 2000, dtype=np.uint64), np.array([0, 2**64 - 1], np.uint64)])
    sizes = bloom.ladder(8)
    for nblocks in (1, 2, 3, 7, 1000, int(sizes[len(sizes) // 2]), int(sizes[-1])):
        for k in range(1, 8):
            compiled = np.empty((len(h2), k), dtype=np.uint64)
            kernels.bloom_positions(h2, nblocks, k, compiled)
            expect = bloom.bloom_positions(h2, nblocks, k)
            assert np.array_equal(compiled, expect), (nblocks, k)
            assert (expect < nblocks * bloom.BLOCK_BITS).all()
            if k > 1:  # b is odd: a gram's k probes are k distinct bits of one block
                assert all(len(set(row.tolist())) == k for row in expect)
                assert (expect // bloom.BLOCK_BITS == expect[:, :1] // bloom.BLOCK_BITS).all()


@pytest.mark.parametrize("n", range(3, 9))
def test_gram_hash_compiled_numpy_and_plain_python_agree(n: int) -> None:
    """The index side (compiled kernels) and the query side (numpy) hash a gram as the plain-Python
    reference does; a few fixed values pin the function itself (a change is a new policy format)."""
    rng = random.Random(n)
    keys = [bytes(rng.randrange(256) for _ in range(n)) for _ in range(300)] + [b"\x00" * n, b"\xff" * n]
    expect = [bloom.gram_hash_bytes(key) for key in keys]
    packed = np.array([int.from_bytes(key, "little") for key in keys], dtype=np.uint64)
    compiled = np.empty(len(keys), dtype=np.uint64)
    kernels.gram_hash_many(packed, n, compiled)
    assert compiled.tolist() == expect
    assert bloom.gram_hash_array(keys).tolist() == expect
    assert sizing.gram_hashes(keys)[1].tolist() == expect


def test_gram_hash_pinned_values() -> None:
    assert bloom.gram_hash_bytes(b"abc") == PINNED[b"abc"]
    assert bloom.gram_hash_bytes(b"MZ\x90\x00") == PINNED[b"MZ\x90\x00"]


def _chunked(data: bytes, seed: int) -> list[tuple[np.ndarray, int]]:
    """Split data the way the streaming reader does: each chunk repeats the last CARRY bytes."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), min(5, max(len(data) - 1, 0)))) if len(data) > 1 else []
    pieces = []
    start = 0
    for end in [*cuts, len(data)]:
        carried = min(start, kernels.CARRY)
        pieces.append((np.frombuffer(data[start - carried : end], dtype=np.uint8), carried))
        start = end
    return pieces


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name", list(_samples()))
def test_hll_and_bloom_match_reference_in_any_chunking(n: int, name: str, fold: bool) -> None:
    data = _samples()[name]
    pieces = _chunked(data, n * 31 + len(data))

    reg = np.zeros(1 << 14, np.int8)
    for chunk, carried in pieces:
        kernels.hll_update(chunk, kernels.first_window(carried, n), n, fold, reg)
    assert np.array_equal(reg, reference.hll_registers(data, n, fold))

    for k, nblocks in ((1, 3), (2, 17), (5, 1)):
        bloom = np.zeros(nblocks * 64, np.uint8)
        for chunk, carried in pieces:
            kernels.bloom_insert(chunk, kernels.first_window(carried, n), n, k, fold, nblocks, bloom)
        assert bloom.tobytes() == reference.bloom(data, n, k, nblocks, fold)

    hist = np.zeros(256, np.int64)
    for chunk, carried in pieces:
        kernels.byte_histogram(chunk, carried, hist)
    assert hist.tolist() == [data.count(bytes([b])) for b in range(256)]


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name", list(_samples()))
def test_exact_3gram_path_matches_reference(name: str, fold: bool) -> None:
    data = _samples()[name]
    bitmap = np.zeros(kernels.PRESENCE_BYTES, np.uint8)
    for chunk, carried in _chunked(data, len(data)):
        kernels.gram3_presence(chunk, kernels.first_window(carried, 3), bitmap)
    if fold:
        kernels.presence_lower(bitmap)
    distinct = set(reference.indexed_grams(data, 3, fold))
    assert int(np.bitwise_count(bitmap).sum()) == len(distinct)
    for k, nblocks in ((1, 5), (3, 2)):
        bloom = np.zeros(nblocks * 64, np.uint8)
        kernels.presence_bloom(bitmap, k, nblocks, bloom)
        assert bloom.tobytes() == reference.bloom(data, 3, k, nblocks, fold)


def test_hll_estimate_equals_datasketch() -> None:
    """The inline linear-counting branch gives datasketch's number, on both sides of its threshold."""
    rng = np.random.default_rng(3)
    for distinct in (0, 1, 50, 2_000, 9_000, 14_000, 16_000, 40_000, 300_000):
        grams = rng.integers(0, 1 << 40, distinct, dtype=np.uint64)
        reg = np.zeros(1 << 14, np.int8)
        kernels.hll_update(grams.view(np.uint8), 0, 8, False, reg)  # overlapping windows: more grams
        want = round(HyperLogLogPlusPlus(p=14, reg=reg).count())
        assert extract.hll_estimate(reg) == want, distinct


def test_lowercasing_every_byte_value() -> None:
    """The 8-bytes-at-a-time lowercasing agrees with the obvious one for every byte in every lane."""
    for value in range(256):
        for lane in range(8):
            gram = np.uint64(value << (8 * lane))
            want = int.from_bytes(reference.lower(int(gram).to_bytes(8, "little")), "little")
            assert int(kernels._lower(gram)) == want, (value, lane)


def _check_document(path: str, data: bytes, policy: Policy) -> None:
    doc = extract.extract_file(path, policy)
    want = reference.document_fields(data, policy, extract.EXACT_MIN_BYTES)
    assert doc.source_id == want["source_id"]
    assert doc.filesize == want["filesize"]
    assert doc.tier1_estimate == want["tier1_estimate"]
    assert doc.tier2_estimate == want["tier2_estimate"]
    assert doc.tier1.tobytes() == want["tier1"]
    assert doc.tier2.tobytes() == want["tier2"]
    assert doc.entropy == pytest.approx(want["entropy"], abs=1e-12)
    assert doc.prefix == want["prefix"]
    with ThreadPoolExecutor(2) as helpers:  # rescanned tiers in two halves on helper threads: same bits
        halved = extract.extract_file(path, policy, helpers)
    assert (halved.tier1_estimate, halved.tier2_estimate) == (doc.tier1_estimate, doc.tier2_estimate)
    assert (halved.tier1.tobytes(), halved.tier2.tobytes()) == (doc.tier1.tobytes(), doc.tier2.tobytes())


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("pair", GRAM_PAIRS)
@pytest.mark.parametrize(("exact_min", "keep_max"), [(1 << 20, 1 << 20), (100, 1 << 20), (1 << 20, 100)])
def test_extract_file_matches_reference(
    tmp_path, monkeypatch, pair, exact_min: int, keep_max: int, fold: bool
) -> None:
    """Every way a tier can be built (exact 3-grams, kept hashes, rescanning) gives the reference's bloom."""
    monkeypatch.setattr(extract, "EXACT_MIN_BYTES", exact_min)
    monkeypatch.setattr(extract, "KEEP_HASHES_MAX_BYTES", keep_max)
    policy = Policy(gram_sizes=pair, id_source="md5", fold_case=fold)
    for name, data in _samples().items():
        path = tmp_path / name
        path.write_bytes(data)
        _check_document(str(path), data, policy)


@pytest.mark.parametrize("exact_min", [1 << 20, 100])
def test_streamed_extraction_equals_in_memory(tmp_path, monkeypatch, exact_min: int) -> None:
    monkeypatch.setattr(extract, "EXACT_MIN_BYTES", exact_min)
    data = _samples()["mixed"] * 3
    path = tmp_path / "big"
    path.write_bytes(data)
    policy = Policy()
    in_memory = extract.extract_file(str(path), policy)
    monkeypatch.setattr(extract, "IN_MEMORY_BYTES", 100)
    monkeypatch.setattr(extract, "STREAM_CHUNK", 333)
    streamed = extract.extract_file(str(path), policy)
    assert streamed.source_id == in_memory.source_id
    assert streamed.tier1.tobytes() == in_memory.tier1.tobytes()
    assert streamed.tier2.tobytes() == in_memory.tier2.tobytes()
    assert streamed.entropy == in_memory.entropy
    _check_document(str(path), data, policy)


def test_estimates_track_distinct_grams() -> None:
    data = os.urandom(200_000)
    array = np.frombuffer(data, dtype=np.uint8)
    reg = np.zeros(1 << 14, np.int8)
    kernels.hll_update(array, 0, 4, False, reg)
    distinct = len(set(reference.grams(data, 4)))
    estimate = HyperLogLogPlusPlus(p=14, reg=reg).count()
    assert abs(estimate - distinct) / distinct < 0.03


def test_unreadable_and_vanished_files_are_skipped(tmp_path) -> None:
    policy = Policy()
    with pytest.raises(extract.SkippedFile, match="No such file"):
        extract.extract_file(str(tmp_path / "missing"), policy)
    with pytest.raises(extract.SkippedFile, match="not a regular file"):
        extract.extract_file("/dev/null", policy)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(b"secret")
        locked.chmod(0)
        with pytest.raises(extract.SkippedFile, match="Permission denied"):
            extract.extract_file(str(locked), policy)


def test_extract_many_yields_in_input_order_with_a_byte_bounded_window(tmp_path, monkeypatch) -> None:
    """Many files of mixed sizes, a missing one among them, and a window bounded by bytes: every file
    comes back once, in input order, the missing one as a problem."""
    monkeypatch.setattr(extract, "PENDING_BYTES", 3000)
    rng = random.Random(11)
    paths = []
    for i in range(40):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice((10, 500, 4000)))))
        paths.append(str(path))
    paths.insert(17, str(tmp_path / "missing"))
    got = list(extract.extract_many(paths, Policy(), workers=2))
    assert [path for path, _, _ in got] == paths
    assert [problem is not None for _, _, problem in got] == [p.endswith("missing") for p in paths]
    for path, doc, _ in got:
        if doc is not None:
            assert doc.filesize == os.path.getsize(path)


def test_extract_many_big_files_share_the_held_budget(tmp_path, monkeypatch) -> None:
    """Big files wait for the bytes others hold (a file alone always goes, even over the budget): every
    file still comes back, in order, with the document extract_file gives."""
    monkeypatch.setattr(extract, "BIG_FILE_BYTES", 1000)
    monkeypatch.setattr(extract, "HELD_BYTES", 3000)
    rng = random.Random(5)
    paths = []
    for i in range(12):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice((300, 1500, 2500, 4000)))))
        paths.append(str(path))
    got = list(extract.extract_many(paths, Policy(), workers=2))
    assert [path for path, _, _ in got] == paths
    for path, doc, problem in got:
        assert problem is None
        alone = extract.extract_file(path, Policy())
        assert (doc.source_id, doc.tier1.tobytes(), doc.tier2.tobytes()) == (
            alone.source_id,
            alone.tier1.tobytes(),
            alone.tier2.tobytes(),
        )


def test_extract_many_stop_starts_no_queued_file(tmp_path) -> None:
    """Files submitted ahead but not started when `stop` is set are never extracted: what comes back is
    the first files, in order (those finished or being extracted then), far fewer than were queued (all
    300: under the look-ahead limits)."""
    paths = []
    for i in range(300):
        path = tmp_path / f"f{i:03d}"
        path.write_bytes(os.urandom(200_000))
        paths.append(str(path))
    stop = threading.Event()
    got = []
    for path, _, _ in extract.extract_many(paths, Policy(), workers=2, stop=stop):
        got.append(path)
        if len(got) == 10:
            stop.set()
    assert got == paths[: len(got)]
    assert len(got) < 150


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


def test_first_run_compiles_after_one_notice_and_later_runs_are_silent(tmp_path) -> None:
    """With numba's cache empty, `local index` prints kernels.COMPILE_NOTICE once before compiling; with
    the cache filled by that run, it prints nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_bytes(b"some text to index " * 50)
    root = str(tmp_path / "forest")
    command = [sys.executable, "-m", "sspry", "local", "index", "--root", root, str(tmp_path / "files")]
    subprocess.run([sys.executable, "-m", "sspry", "init", "--root", root], check=True, capture_output=True)
    runs = [subprocess.run(command, env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    assert runs[0].stderr.count(kernels.COMPILE_NOTICE) == 1, runs[0].stderr
    assert kernels.COMPILE_NOTICE not in runs[1].stderr, runs[1].stderr


def test_warm_kernels_compiles_what_a_small_file_needs(tmp_path) -> None:
    """extract.warm_kernels calls the kernels with the types extract_file uses: after it, extracting a
    small file adds no specialisation (one would compile, silently, inside the first file)."""
    sample = tmp_path / "sample"
    sample.write_bytes(random.Random(1).randbytes(100_000))
    code = (
        "import sys\n"
        "from sspry.features import extract, kernels, sizing\n"
        "from sspry.policy import Policy\n"
        "def loaded():\n"
        "    return {n: len(k.signatures) for n, k in vars(kernels).items() if hasattr(k, 'signatures')}\n"
        "policy = Policy()\n"
        "extract.warm_kernels(policy)\n"
        "before = loaded()\n"
        f"extract.extract_file({str(sample)!r}, policy)\n"
        "print(before == loaded(), sum(before.values()))\n"
    )
    same, count = _python(code, dict(os.environ)).stdout.split()
    assert same == "True" and int(count) >= 4
