"""Compiled (numba, GIL-free) loops over file bytes and bloom bytes: the only per-byte work in sspry.

Kernels see one chunk at a time. A chunk after the first starts with the last CARRY bytes of the one
before, and `first` says where the windows not seen yet begin, so streaming a file in chunks gives the
same result as one pass over it. Grams are the n bytes at each position packed little-endian into a
uint64 (n <= 8) and hashed with sspry/bloom.py's `gram_hash` (two multiplies); `sizing.py` documents how
the hash is used and `tests/test_kernels.py` checks every kernel against the plain-Python hash,
datasketch and bitarray.

3-grams have only 2**24 values, so Tier 1 at the default gram size needs no hashing per window: a 2 MiB
presence bitmap marks the grams a file holds (exact count, no estimate), and only the distinct ones are
hashed into the bloom. Other gram sizes are counted with HyperLogLog and inserted window by window.
With case folding (the policy's `fold_case`), a gram holding ASCII capitals is inserted lowercased too,
so the bloom holds lower(g) for every gram g of the file and a `nocase` window is one gram to test.
Every window is hashed (no branch on what it holds); when hashes are kept or inserted, a small
direct-mapped table of recent hashes drops the repeats (about half the windows of binaries): HLL and
bloom inserts are idempotent.

The query side's kernels, `gather_rows`, `probe_rows` and `run_program` (see query/gather.py and
query/program.py), live here too, so this is the only module that imports numba. numba keeps the machine
code on disk (`cache=True`); on a machine's first run, or after an upgrade, a kernel compiles on its
first call, after COMPILE_NOTICE on stderr.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, event
from numba.extending import intrinsic

from sspry import bloom as geometry
from sspry.features.runs import LONG_WORD, RUN_MIN

CARRY = 7  # bytes a chunk repeats from the previous one: enough for the largest gram (8)
PRESENCE_BYTES = 1 << 21  # one bit per possible 3-gram
_PREFETCH_AHEAD = 16
_PART_BATCH = 1 << 20  # hashes sorted by bloom region at a time (8 MiB of them)
_LOCAL_BYTES = 1 << 20  # blooms up to this size stay in a core's cache: built without sorting
_PARTITION_BITS = 8
# slots of the recent-hash filter at most: when hashes are kept (files up to 1 MiB; 32 KiB, in L1: drops
# ~half a binary's windows) and when they are inserted straight into a big bloom (512 KiB, in L2: ~2/3)
_RECENT_KEPT = 1 << 12
_RECENT_INSERT = 1 << 16
_PARTITION_MIN = 1 << 12  # fewer hashes than this are inserted as they come
_GATHER_AHEAD = 12
_BLOCK_BYTES = geometry.BLOCK_BYTES
_BLOCK_BITS = geometry.BLOCK_BITS
COMPILE_NOTICE = "sspry: compiling kernels for this machine (first run only, a few seconds)..."


def _start_numba_without_scipy() -> None:
    """Set up numba's CPU target now, with `scipy.linalg.cython_blas` failing to import.

    The target (set up on the first compile or cache load) imports scipy.linalg, 0.1 s, only to see
    whether np.correlate and np.convolve may call BLAS; no kernel here uses them (without it numba uses
    its own loop), and np.dot or np.linalg in any jitted function still import scipy when compiled.
    Relies on numba internals, so any failure just leaves numba to set itself up as usual."""
    blocked = "scipy.linalg.cython_blas"
    if blocked in sys.modules:
        return
    sys.modules[blocked] = None  # makes `import scipy.linalg.cython_blas` raise ImportError
    try:
        from numba.core.registry import cpu_target

        cpu_target.target_context.refresh()
    except Exception:
        pass
    finally:
        if sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]


class _CompileNotice(event.Listener):
    """Print COMPILE_NOTICE on stderr, once per process, when numba starts compiling a kernel of this
    module. numba compiles only when its on-disk cache ($NUMBA_CACHE_DIR, else `__pycache__` here, else
    the user's cache directory when that is read-only) holds no machine code for the call, so a warm
    cache stays silent. Compilations run under numba's global lock: no race on `shown`."""

    def __init__(self) -> None:
        self.shown = False

    def on_start(self, ev: event.Event) -> None:
        if self.shown:
            return
        try:
            ours = ev.data["dispatcher"].py_func.__module__ == __name__
        except Exception:
            return
        if ours:
            self.shown = True
            print(COMPILE_NOTICE, file=sys.stderr, flush=True)

    def on_end(self, ev: event.Event) -> None:
        pass


_start_numba_without_scipy()
with contextlib.suppress(Exception):  # should numba's event API change: no notice, never a failure
    event.register("numba:compile", _CompileNotice())


def first_window(carried: int, n: int) -> int:
    """Index of the first n-gram of a chunk that begins with `carried` bytes already seen."""
    return max(0, carried - (n - 1))


@intrinsic
def _ctlz64(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def _cttz64(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


def _prefetch_codegen(write: int):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(function, [pointer, ir.Constant(i32, write), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """LLVM prefetch (for write, high locality) of array[index]."""
    return types.void(array, index), _prefetch_codegen(1)


@intrinsic
def _prefetch_read(typingctx, array, index):
    """LLVM prefetch (for read, high locality) of array[index]."""
    return types.void(array, index), _prefetch_codegen(0)


# The gram hash, compiled from sspry/bloom.py as it is written there (the query side hashes with the same
# function through numpy).
_gram_hash = njit(inline="always")(geometry.gram_hash)


@njit(inline="always")
def gram_hash_of(gram, n):
    """The hash of an n-byte gram packed in `gram` (a uint64)."""
    return _gram_hash(gram, np.uint64(n))


@njit(nogil=True, cache=True)
def gram_hash_many(grams, n, out):
    """out[i] = the hash of n-byte gram grams[i]: the compiled hash, for tests to hold to the reference."""
    for i in range(grams.shape[0]):
        out[i] = gram_hash_of(grams[i], n)


_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_TO_A = np.uint64(0x3F3F3F3F3F3F3F3F)  # 0x80 - 0x41: a heptet >= 'A' gets its high bit set
_PAST_Z = np.uint64(0x2525252525252525)  # 0x80 - 0x5B: a heptet > 'Z' gets its high bit set


@njit(inline="always")
def _lower(gram):
    """The packed gram with ASCII 'A'-'Z' bytes made lowercase, eight bytes at a time (SWAR)."""
    heptets = gram & _LOW7
    upper = (heptets + _TO_A) & ~(heptets + _PAST_Z) & ~gram & _HIGH
    return gram | (upper >> np.uint64(2))


@njit(inline="always")
def _load(chunk, i, n):
    gram = np.uint64(0)
    for j in range(n):
        gram |= np.uint64(chunk[i + j]) << np.uint64(8 * j)
    return gram


@intrinsic
def _load_u64(typingctx, array, index):
    """The 8 bytes of a uint8 array from `index` on as one little-endian uint64 (an unaligned load; the
    caller keeps index + 8 <= len)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(pointer, align=1)

    return types.uint64(array, index), codegen


@njit(inline="always")
def _gram(chunk, i, n):
    """The n-gram at position i packed little-endian: one 8-byte load, masked, except in the last 7
    bytes (byte by byte there). Four single-byte loads per window cost 4x the hashing: measured."""
    if i + 8 <= chunk.shape[0]:
        return _load_u64(chunk, i) & (_ALL_ONES >> np.uint64(64 - 8 * n))  # n = 8: no shift by 64
    return _load(chunk, i, n)


# The bloom geometry, compiled from sspry/bloom.py as it is written there. numba's cache is keyed on this
# file, not that one: the geometry is the on-disk format and never changes without a format version.
_gram_probes = njit(inline="always")(geometry.gram_probes)
_probe_bit = njit(inline="always")(geometry.probe_bit)


@njit(inline="always")
def _set_bits(bloom_bytes, h2, blocks, k):
    base, a, b = _gram_probes(h2, blocks)
    for probe in range(k):
        bit = _probe_bit(base, a, b, np.uint64(probe))
        bloom_bytes[bit >> np.uint64(3)] |= np.uint8(1) << np.uint8(bit & np.uint64(7))


@njit(inline="always")
def _apply(hashes, count, bloom_bytes, blocks, k):
    """Set the bits of a batch of hashed grams, prefetching the blocks a few grams ahead: bloom building
    is bound by cache misses, and this lets them overlap."""
    for q in range(count):
        if q + _PREFETCH_AHEAD < count:
            block_bit, _, _ = _gram_probes(hashes[q + _PREFETCH_AHEAD], blocks)
            _prefetch(bloom_bytes, block_bit >> np.uint64(3))
        _set_bits(bloom_bytes, hashes[q], blocks, k)


@njit(inline="always")
def _apply_local(hashes, count, bloom_bytes, blocks, k):
    """Set the bits of the first `count` hashes like _apply, but for a bloom bigger than a core's cache
    first sort each batch of _PART_BATCH hashes into 256 regions (a counting sort on the hash's top 8
    bits: the block grows with them) and insert region by region, so the bits set hit cache instead of
    missing it once per gram: ~2 ns to sort and ~2 to set a gram against ~8 in an 8 MiB bloom (measured;
    fewer regions sort slower, each counter a chain of dependent increments). Same bits either way."""
    if bloom_bytes.shape[0] <= _LOCAL_BYTES or count < _PARTITION_MIN:
        _apply(hashes, count, bloom_bytes, blocks, k)
        return
    regions = 1 << _PARTITION_BITS
    shift = np.uint64(64 - _PARTITION_BITS)
    scratch = np.empty(min(count, _PART_BATCH), dtype=np.uint64)
    at = np.empty(regions + 1, dtype=np.int64)
    for start in range(0, count, _PART_BATCH):
        end = min(count, start + _PART_BATCH)
        at[:] = 0
        for q in range(start, end):
            at[np.int64(hashes[q] >> shift) + 1] += 1
        for r in range(regions):
            at[r + 1] += at[r]
        for q in range(start, end):
            region = np.int64(hashes[q] >> shift)
            scratch[at[region]] = hashes[q]
            at[region] += 1
        _apply(scratch, end - start, bloom_bytes, blocks, k)


@njit(nogil=True, cache=True)
def bloom_positions(h2, nblocks, k, out):
    """out[g, i] = bit position of probe i of gram g in a bloom of `nblocks` blocks: the compiled probe
    functions, for tests to hold against their numpy reference (sspry/bloom.py)."""
    blocks = np.uint64(nblocks)
    for g in range(h2.shape[0]):
        base, a, b = _gram_probes(h2[g], blocks)
        for probe in range(k):
            out[g, probe] = _probe_bit(base, a, b, np.uint64(probe))


@njit(nogil=True, cache=True)
def byte_histogram(chunk, first, hist):
    """Count byte values from `first` on, in four interleaved lanes: a single counter per value
    serialises on runs of one byte (zero padding), four let the increments overlap."""
    lanes = np.zeros((4, 256), dtype=np.int64)
    size = chunk.shape[0]
    end = first + (size - first) // 4 * 4
    for i in range(first, end, 4):
        lanes[0, chunk[i]] += 1
        lanes[1, chunk[i + 1]] += 1
        lanes[2, chunk[i + 2]] += 1
        lanes[3, chunk[i + 3]] += 1
    for i in range(end, size):
        lanes[0, chunk[i]] += 1
    for value in range(256):
        hist[value] += lanes[0, value] + lanes[1, value] + lanes[2, value] + lanes[3, value]


# --- byte-class runs: the run fields of the sidecar (features/runs.py) -------------------------------
@intrinsic
def _class_masks(typingctx, array, index):
    """Three 16-bit masks of the 16 bytes from `index` on (the caller keeps index + 16 <= len), one bit
    per byte: bits 0-15 hex digits, 16-31 fullword delimiters (not an ASCII letter or digit), 32-47
    zero bytes. Vector compares: a few instructions for 16 bytes."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        vector = ir.VectorType(ir.IntType(8), 16)
        v = builder.load(builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer()), align=1)

        def splat(value):
            return ir.Constant(vector, [value] * 16)

        digit = builder.icmp_unsigned("<", builder.sub(v, splat(0x30)), splat(10))
        letter = builder.sub(builder.or_(v, splat(0x20)), splat(0x61))  # 'a'..'z' and 'A'..'Z' -> 0..25
        hex_letter = builder.icmp_unsigned("<", letter, splat(6))
        any_letter = builder.icmp_unsigned("<", letter, splat(26))
        zero = builder.icmp_unsigned("==", v, splat(0))
        i16, i64 = ir.IntType(16), ir.IntType(64)

        def bits(mask, shift):
            return builder.shl(builder.zext(builder.bitcast(mask, i16), i64), ir.Constant(i64, shift))

        hex_bits = bits(builder.or_(digit, hex_letter), 0)
        delimiters = bits(builder.not_(builder.or_(digit, any_letter)), 16)
        return builder.or_(hex_bits, builder.or_(delimiters, bits(zero, 32)))

    return types.uint64(array, index), codegen


@intrinsic
def _popcount64(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(inline="always")
def _byte_masks(b):
    """_class_masks' bits of one byte value (bit 0 hex, bit 16 delimiter, bit 32 zero)."""
    digit = np.uint64(0x30) <= b <= np.uint64(0x39)
    letter = (b | np.uint64(0x20)) - np.uint64(0x61)
    hexed = digit or letter < np.uint64(6)
    word = digit or letter < np.uint64(26)
    return np.uint64(hexed) | (np.uint64(not word) << np.uint64(16)) | (np.uint64(b == 0) << np.uint64(32))


# state slots of class_runs
RUN_NEXT, RUN_HEX, RUN_HEX_BEST, RUN_CLEAN, RUN_WORD_BEST, RUN_PREV_HEX, RUN_WIDE0, RUN_WIDE1 = range(8)
RUN_WIDE_BEST, RUN_WORD_LENGTHS, RUN_STATE = 8, 9, 10
# RUN_WORD_LENGTHS: bit n for a fullword hex run of exactly n (RUN_MIN <= n < LONG_WORD), LONG_WORD for longer


@njit(inline="always")
def _ended(state, length, word):
    """A run of `length` >= RUN_MIN hex digits ended, between fullword delimiters if `word`. (Shorter
    runs are not kept: testing the length first is a branch the CPU predicts.)"""
    if length > state[RUN_HEX_BEST]:
        state[RUN_HEX_BEST] = length
    if word:
        if length > state[RUN_WORD_BEST]:
            state[RUN_WORD_BEST] = length
        state[RUN_WORD_LENGTHS] |= np.int64(1) << min(length, LONG_WORD)


@njit(inline="always")
def _ones_from_top(x, width):
    """Consecutive one bits of a `width`-bit value from its top bit down."""
    return _ctlz64(~(x << np.uint64(64 - width))) if width < 64 else _ctlz64(~x)


@njit(inline="always")
def _runs_block(masks, width, at, state):
    """Fold one block of `width` (<= 16) bytes starting at absolute offset `at` into the run state."""
    one = np.uint64(1)
    full = (one << np.uint64(width)) - one
    h = masks & full
    d = (masks >> np.uint64(16)) & full
    z = (masks >> np.uint64(32)) & full
    # hex run and fullword (clean) hex run
    run = state[RUN_HEX]
    if h == 0:
        if run >= RUN_MIN:
            _ended(state, run, state[RUN_CLEAN] and d & one)
        state[RUN_HEX] = 0
        state[RUN_CLEAN] = np.int64((d >> np.uint64(width - 1)) & one)
    elif h == full:
        state[RUN_HEX] = run + width
    else:
        lead = np.int64(_cttz64(~h))
        total = run + lead
        if total >= RUN_MIN:
            _ended(state, total, state[RUN_CLEAN] and (d >> np.uint64(lead)) & one)
        tail = np.int64(_ones_from_top(h, width))
        inner = (
            h
            & ~((one << np.uint64(lead)) - one)
            & ~(((one << np.uint64(tail)) - one) << np.uint64(width - tail))
        )
        y = inner & (inner >> one)
        y &= y >> np.uint64(2)
        y &= y >> np.uint64(4)
        while y:  # a run of at least 8 inside the block (rare): each one
            start = _cttz64(inner)
            length = np.int64(_cttz64(~(inner >> start)))
            if length >= RUN_MIN:
                _ended(state, length, (d >> (start - one)) & (d >> (start + np.uint64(length))) & one)
            inner &= ~(((one << np.uint64(length)) - one) << start)
            y = inner & (inner >> one)
            y &= y >> np.uint64(2)
            y &= y >> np.uint64(4)
        state[RUN_HEX] = tail
        state[RUN_CLEAN] = np.int64((d >> np.uint64(width - tail - 1)) & one)  # before the tail run
    # wide hex run: bit j = the byte before j is a hex digit and byte j is zero, a (digit, 0) pair that
    # starts at at + j - 1; pairs chain two bytes apart, so each parity of start offset has its own run
    pairs = ((h << one) | np.uint64(state[RUN_PREV_HEX])) & z
    state[RUN_PREV_HEX] = np.int64((h >> np.uint64(width - 1)) & one)
    if pairs == 0 and width > 1:  # most blocks: both runs end here (one byte holds one parity only)
        state[RUN_WIDE_BEST] = max(state[RUN_WIDE_BEST], state[RUN_WIDE0], state[RUN_WIDE1])
        state[RUN_WIDE0] = 0
        state[RUN_WIDE1] = 0
        return
    for parity in range(2):
        # positions j of this block whose pair starts at an offset of this parity
        select = np.uint64(0x5555) if (at - 1 + parity) & 1 == 0 else np.uint64(0xAAAA)
        select &= full
        slot = RUN_WIDE0 + parity
        real = pairs & select
        if real == select:
            state[slot] += np.int64(_popcount64(select))
            continue
        filled = real | (full & ~select)
        first_gap = _cttz64(~filled)
        total = state[slot] + np.int64(_popcount64(select & ((one << first_gap) - one)))
        if total >= RUN_MIN and total > state[RUN_WIDE_BEST]:
            state[RUN_WIDE_BEST] = total
        top = np.int64(_ones_from_top(filled, width))
        state[slot] = np.int64(_popcount64(select & ~((one << np.uint64(width - top)) - one)))


@njit(nogil=True, cache=True)
def class_runs(chunk, first, state):
    """Fold the bytes of `chunk` from `first` on into `state` (RUN_STATE int64 slots, see
    features/runs.py): the longest run of hex digits, of hex digits between fullword delimiters, and of
    wide (digit, 0) pairs, exact from RUN_MIN up. Blocks of 16 bytes are classified with vector
    compares; a chunk's last few bytes one at a time."""
    size = chunk.shape[0]
    at = state[RUN_NEXT]
    i = first
    while i + 16 <= size:
        _runs_block(_class_masks(chunk, i), 16, at, state)
        i += 16
        at += 16
    if i < size:
        masks = np.uint64(0)
        for j in range(size - i):
            masks |= _byte_masks(np.uint64(chunk[i + j])) << np.uint64(j)
        _runs_block(masks, size - i, at, state)
        at += size - i
    state[RUN_NEXT] = at


@njit(nogil=True, cache=True)
def gram3_presence(chunk, first, bitmap):
    """Mark every 3-gram of the chunk (windows from `first`) in a 2**24-bit presence bitmap (with case
    folding, presence_lower afterwards adds their lowercase forms)."""
    for i in range(first, chunk.shape[0] - 2):
        gram = _gram(chunk, i, 3)
        bitmap[gram >> np.uint64(3)] |= np.uint8(1) << np.uint8(gram & np.uint64(7))


@njit(nogil=True, cache=True)
def presence_lower(bitmap):
    """Mark the lowercase form of every 3-gram marked: once per distinct gram instead of once per
    window (a second bitmap update per window cost 0.45 of the pass; this costs ~0.2 of it on 50 MB of
    binaries). A form marked here has no capitals, so lowering it again changes nothing."""
    for byte_index in range(bitmap.shape[0]):
        bits = bitmap[byte_index]
        if bits == 0:
            continue
        for bit in range(8):
            if (bits >> bit) & 1:
                low = _lower(np.uint64(byte_index * 8 + bit))
                bitmap[low >> np.uint64(3)] |= np.uint8(1) << np.uint8(low & np.uint64(7))


@njit(nogil=True, cache=True)
def presence_bloom(bitmap, k, nblocks, bloom):
    """Insert every 3-gram marked in the presence bitmap into the bloom."""
    blocks = np.uint64(nblocks)
    hashes = np.empty(_PART_BATCH, dtype=np.uint64)
    count = 0
    for byte_index in range(bitmap.shape[0]):
        bits = bitmap[byte_index]
        if bits == 0:
            continue
        for bit in range(8):
            if not (bits >> bit) & 1:
                continue
            h2 = gram_hash_of(np.uint64(byte_index * 8 + bit), 3)
            hashes[count] = h2
            count += 1
            if count == _PART_BATCH:
                _apply_local(hashes, count, bloom, blocks, k)
                count = 0
    _apply_local(hashes, count, bloom, blocks, k)


@njit(nogil=True, cache=True)
def entropy(hist):
    """Shannon entropy in bits per byte, summed in YARA's order (byte 0 to 255) so it is bit-identical
    to math.entropy(0, filesize); 0 for an empty file."""
    total = 0
    for value in range(256):
        total += hist[value]
    result = 0.0
    if total == 0:
        return result
    for value in range(256):
        if hist[value]:
            x = hist[value] / total
            result -= x * np.log2(x)
    return result


@njit(inline="always")
def _hll_rank(h1, reg):
    index = h1 & np.uint64(16383)
    rank = np.int8(_ctlz64(h1 >> np.uint64(14)) - np.uint64(13))
    if rank > reg[index]:
        reg[index] = rank


@njit(inline="always")
def _hll_add(gram, n, reg):
    h1 = gram_hash_of(gram, n)
    _hll_rank(h1, reg)


_RUN = 1024  # windows hashed at a time into a buffer, by a loop the compiler vectorises


@njit(inline="always")
def _hash_run(chunk, start, count, n, fold, out):
    """out[j] = the hash of the n-gram at start + j for j < count, and with `fold` out[count + j] = the
    hash of its lowercase form. Nothing but loads, masks and the hash in the loop, so LLVM vectorises
    it (8 windows a step with AVX-512); the per-window work that cannot be (the recent-hash filter, the
    HyperLogLog register) reads the buffer after: HLL passes 1.2x (1.4x folded) faster, measured."""
    if start + count + 7 <= chunk.shape[0]:
        mask = _ALL_ONES >> np.uint64(64 - 8 * n)
        for j in range(count):
            out[j] = gram_hash_of(_load_u64(chunk, start + j) & mask, n)
        if fold:
            for j in range(count):
                out[count + j] = gram_hash_of(_lower(_load_u64(chunk, start + j) & mask), n)
    else:  # the last windows: no 8-byte load past the end
        for j in range(count):
            gram = _gram(chunk, start + j, n)
            out[j] = gram_hash_of(gram, n)
            if fold:
                out[count + j] = gram_hash_of(_lower(gram), n)


@njit(inline="always")
def _hll_loop(chunk, first, n, fold, reg):
    run = np.empty(2 * _RUN, dtype=np.uint64)
    last = chunk.shape[0] - n + 1
    i = first
    while i < last:  # no branches but the register's: adds are idempotent
        count = min(_RUN, last - i)
        _hash_run(chunk, i, count, n, fold, run)
        for j in range(2 * count if fold else count):
            _hll_rank(run[j], reg)
        i += count


@njit(inline="always")
def _recent_table(windows, most):
    """A direct-mapped table of the last gram hash seen in each slot: a hash found in its slot was added
    already (HLL and bloom inserts are idempotent), so it is not added again. A power of two of slots,
    from 2**10 up to `most` as `windows` grows (filling a big table costs more than a small file). Slot
    j starts as ~j, a value no hash stored in slot j can equal (its low bits are j): no false hit."""
    slots = 1 << 10
    while slots < most and slots < windows:
        slots <<= 1
    table = np.empty(slots, dtype=np.uint64)
    for j in range(slots):
        table[j] = ~np.uint64(j)
    return table


@njit(inline="always")
def _fresh(table, h):
    """1 unless `h` was the last hash in its slot, which it now is; without a branch (half the windows
    of a binary repeat: a branch on it is mispredicted half the time)."""
    slot = h & np.uint64(table.shape[0] - 1)
    fresh = np.int64(table[slot] != h)
    table[slot] = h
    return fresh


@njit(inline="always")
def _collect_loop(chunk, first, n, fold, reg, out):
    table = _recent_table(chunk.shape[0] - first, _RECENT_KEPT)
    run = np.empty(2 * _RUN, dtype=np.uint64)
    count = 0
    last = chunk.shape[0] - n + 1
    i = first
    while i < last:
        windows = min(_RUN, last - i)
        _hash_run(chunk, i, windows, n, fold, run)
        for j in range(windows):  # each window's lowercase form right after it, as the filter wants
            h = run[j]
            _hll_rank(h, reg)
            out[count] = h  # kept only if fresh: otherwise the next one overwrites it
            count += _fresh(table, h)
            if fold:  # no branch on low != gram: then its hash was just recorded and is not fresh
                h = run[windows + j]
                _hll_rank(h, reg)
                out[count] = h
                count += _fresh(table, h)
        i += windows
    return count


@njit(inline="always")
def _bloom_loop(chunk, first, n, k, fold, nblocks, bloom):
    blocks = np.uint64(nblocks)
    hashes = np.empty((2 if fold else 1) * min(_PART_BATCH, max(0, chunk.shape[0] - first)), dtype=np.uint64)
    table = _recent_table(chunk.shape[0] - first, _RECENT_INSERT)
    run = np.empty(2 * _RUN, dtype=np.uint64)
    start = first
    last = chunk.shape[0] - n + 1
    while start < last:
        end = min(last, start + _PART_BATCH)
        count = 0
        i = start
        while i < end:
            windows = min(_RUN, end - i)
            _hash_run(chunk, i, windows, n, fold, run)
            for j in range(windows):  # each window's lowercase form right after it, as in _collect_loop
                h = run[j]
                hashes[count] = h  # kept only if fresh: otherwise the next one overwrites it
                count += _fresh(table, h)
                if fold:
                    h = run[windows + j]
                    hashes[count] = h
                    count += _fresh(table, h)
            i += windows
        _apply_local(hashes, count, bloom, blocks, k)
        start = end


# The gram size must be a compile-time constant for the load and hash to unroll: one copy per size.
@njit(nogil=True, cache=True)
def hll_update(chunk, first, n, fold, reg):
    """Add the n-grams of `chunk` (windows from `first`), with `fold` also their lowercase forms, to
    HyperLogLog++ registers (int8[16384], p=14)."""
    if n == 3:
        _hll_loop(chunk, first, 3, fold, reg)
    elif n == 4:
        _hll_loop(chunk, first, 4, fold, reg)
    elif n == 5:
        _hll_loop(chunk, first, 5, fold, reg)
    elif n == 6:
        _hll_loop(chunk, first, 6, fold, reg)
    elif n == 7:
        _hll_loop(chunk, first, 7, fold, reg)
    else:
        _hll_loop(chunk, first, 8, fold, reg)


@njit(nogil=True, cache=True)
def bloom_insert(chunk, first, n, k, fold, nblocks, bloom):
    """Set the k probe bits of every n-gram of `chunk` (windows from `first`), with `fold` also of their
    lowercase forms, in a blocked bloom."""
    if n == 3:
        _bloom_loop(chunk, first, 3, k, fold, nblocks, bloom)
    elif n == 4:
        _bloom_loop(chunk, first, 4, k, fold, nblocks, bloom)
    elif n == 5:
        _bloom_loop(chunk, first, 5, k, fold, nblocks, bloom)
    elif n == 6:
        _bloom_loop(chunk, first, 6, k, fold, nblocks, bloom)
    elif n == 7:
        _bloom_loop(chunk, first, 7, k, fold, nblocks, bloom)
    else:
        _bloom_loop(chunk, first, 8, k, fold, nblocks, bloom)


@njit(nogil=True, cache=True)
def hll_collect(chunk, first, n, fold, reg, out):
    """hll_update that also keeps each gram's bloom hash (h2) in `out` (room for 2 per window with
    `fold`), so the bloom can be built without hashing again; returns how many were kept."""
    if n == 3:
        return _collect_loop(chunk, first, 3, fold, reg, out)
    if n == 4:
        return _collect_loop(chunk, first, 4, fold, reg, out)
    if n == 5:
        return _collect_loop(chunk, first, 5, fold, reg, out)
    if n == 6:
        return _collect_loop(chunk, first, 6, fold, reg, out)
    if n == 7:
        return _collect_loop(chunk, first, 7, fold, reg, out)
    return _collect_loop(chunk, first, 8, fold, reg, out)


@njit(nogil=True, cache=True)
def bloom_apply(hashes, count, k, nblocks, bloom):
    """Set the bits of the first `count` kept hashes (see hll_collect)."""
    _apply_local(hashes, count, bloom, np.uint64(nblocks), k)


# --- query side: gram rows out of bit-sliced class matrices, and plan programs over packed bitmaps ------
@njit(inline="always")
def _prefetch_gram(blooms, offsets, blocks, counts, c, h, k):
    """Start loading the bytes gram hash `h` reads in class c: its k sliced rows and tail bytes."""
    q = counts[c] // 8
    row_bytes = blocks[c] * _BLOCK_BYTES
    tail = offsets[c] + row_bytes * 8 * q
    base, a, b = _gram_probes(h, np.uint64(blocks[c]))
    for i in range(k):
        position = np.int64(_probe_bit(base, a, b, np.uint64(i)))
        if q:
            _prefetch_read(blooms, offsets[c] + position * q)
        for t in range(counts[c] - 8 * q):
            _prefetch_read(blooms, tail + t * row_bytes + (position >> 3))


@njit(nogil=True, cache=True)
def gather_rows(blooms, offsets, blocks, counts, starts, members, contiguous, h2, dest, k, keep, out):
    """Set in row dest[g] of `out` (a zeroed uint8 view of packed document bitmaps: document d is bit
    d % 8 of byte d // 8) the documents whose bloom holds all k probe bits of gram g, among those set in
    `keep` (the same layout; empty: every document). See query/gather.py and store/segment.py.

    A class of count = 8*q + r documents is read as ceil(count/8) bytes per bloom bit: q bytes of its
    bit-sliced matrix and, when r > 0, a byte assembled from its r tail documents' plain blooms. The k
    probe rows are ANDed byte by byte, each byte masked with the class's documents in `keep`. With
    `contiguous` (Tier 1) class c holds documents starts[c]..starts[c]+count-1 and the bytes are copied
    into the row shifted by starts[c] % 8; otherwise (Tier 2) its i-th document is members[starts[c] + i]
    and each set bit is scattered. Every (class, gram) read is a cache miss or several, so the reads of
    the (class, gram) _GATHER_AHEAD steps later are prefetched (the caller orders grams by block, so each
    class matrix is walked from top to bottom)."""
    classes = offsets.shape[0]
    grams = h2.shape[0]
    masked = keep.shape[0] > 0
    # which classes to read, and per byte of each class (at kept_at[c]) which of its documents are kept
    kept_at = np.zeros(classes + 1, dtype=np.int64)
    most = 0
    for c in range(classes):
        kept_at[c + 1] = kept_at[c] + (counts[c] + 7) // 8
        most = max(most, (counts[c] + 7) // 8)
    kept = np.full(kept_at[classes], 0xFF, dtype=np.uint8)
    wanted = np.empty(classes, dtype=np.int64)
    n_wanted = 0
    for c in range(classes):
        any_kept = not masked
        if masked:
            for j in range((counts[c] + 7) // 8):
                byte = 0
                for bit in range(min(8, counts[c] - 8 * j)):
                    d = starts[c] + 8 * j + bit if contiguous else members[starts[c] + 8 * j + bit]
                    byte |= ((keep[d >> 3] >> (d & 7)) & 1) << bit
                kept[kept_at[c] + j] = byte
                any_kept |= byte != 0
        if any_kept and counts[c]:
            wanted[n_wanted] = c
            n_wanted += 1
    acc = np.empty(most, dtype=np.uint8)
    rows = np.empty(k, dtype=np.int64)
    # Prefetching pays when consecutive grams' rows are far apart (a few grams in big blooms: a cache miss
    # each); with many grams per class the rows they read are next to each other and it only costs.
    bits = 0
    for w in range(n_wanted):
        bits += blocks[wanted[w]] * _BLOCK_BITS
    sparse = grams * k * 64 * n_wanted < bits
    ahead_class = n_wanted if not sparse else 0  # the (class, gram) to prefetch next: index into `wanted`
    ahead_gram = 0
    for _ in range(min(_GATHER_AHEAD, n_wanted * grams) if sparse else 0):
        _prefetch_gram(blooms, offsets, blocks, counts, wanted[ahead_class], h2[ahead_gram], k)
        ahead_gram += 1
        if ahead_gram == grams:
            ahead_gram = 0
            ahead_class += 1
    for w in range(n_wanted):
        c = wanted[w]
        count = counts[c]
        q = count // 8
        rest = count - 8 * q
        nbytes = (count + 7) // 8
        start = starts[c]
        nblocks = np.uint64(blocks[c])
        row_bytes = blocks[c] * _BLOCK_BYTES
        tail = offsets[c] + row_bytes * 8 * q
        kept_c = kept[kept_at[c] : kept_at[c + 1]]
        shift = start & 7
        first_byte = start >> 3
        for g in range(grams):
            if ahead_class < n_wanted:
                _prefetch_gram(blooms, offsets, blocks, counts, wanted[ahead_class], h2[ahead_gram], k)
                ahead_gram += 1
                if ahead_gram == grams:
                    ahead_gram = 0
                    ahead_class += 1
            base, a, b = _gram_probes(h2[g], nblocks)
            for i in range(k):
                position = np.int64(_probe_bit(base, a, b, np.uint64(i)))
                rows[i] = offsets[c] + position * q
                if rest:  # the tail documents' bits at this position, as one more byte of the row
                    byte = 0
                    for t in range(rest):
                        byte |= ((blooms[tail + t * row_bytes + (position >> 3)] >> (position & 7)) & 1) << t
                    acc[q] = (kept_c[q] if i == 0 else acc[q]) & byte
            for j in range(q):
                acc[j] = blooms[rows[0] + j] & kept_c[j]
            for i in range(1, k):
                for j in range(q):
                    acc[j] &= blooms[rows[i] + j]
            row = dest[g]
            if contiguous:
                if shift == 0:
                    for j in range(nbytes):
                        out[row, first_byte + j] |= acc[j]
                else:
                    for j in range(nbytes - 1):  # the next byte holds documents of this class too
                        value = np.int64(acc[j]) << shift
                        out[row, first_byte + j] |= np.uint8(value & 0xFF)
                        out[row, first_byte + j + 1] |= np.uint8(value >> 8)
                    value = np.int64(acc[nbytes - 1]) << shift
                    out[row, first_byte + nbytes - 1] |= np.uint8(value & 0xFF)
                    if value >> 8:  # only if it holds documents of this class: it may be past the row
                        out[row, first_byte + nbytes] |= np.uint8(value >> 8)
            else:
                for j in range(nbytes):
                    value = acc[j]
                    if value:
                        for bit in range(8):
                            if (value >> bit) & 1:
                                d = members[start + 8 * j + bit]
                                out[row, d >> 3] |= np.uint8(1 << (d & 7))


@njit(nogil=True, cache=True)
def probe_rows(
    blooms,
    offsets,
    blocks,
    counts,
    doc_class,
    doc_column,
    h2,
    k,
    plans,
    plan_starts,
    plan_rows,
    candidates,
    out,
):
    """Document at a time: for each plan p of `plans`, each document d set in candidates[p] and each gram
    row r of plan_rows[plan_starts[p]:plan_starts[p + 1]], set bit d of out[r] (packed uint64 bitmaps)
    when d's bloom holds all k probe bits of gram h2[r]. Costs k byte reads per (document, gram) pair,
    against gather_rows' pass over whole classes: the way to read a plan's rows for its few survivors."""
    for pi in range(plans.shape[0]):
        p = plans[pi]
        for w in range(candidates.shape[1]):
            word = candidates[p, w]
            while word:
                d = w * 64 + np.int64(_cttz64(word))
                word &= word - np.uint64(1)
                c = doc_class[d]
                column = doc_column[d]
                q = counts[c] // 8
                nblocks = np.uint64(blocks[c])
                if column < 8 * q:  # bit-sliced: bit (column % 8) of byte (column // 8) of each row
                    at = offsets[c] + (column >> 3)
                    stride = q
                    bit = column & 7
                    tail = False
                else:  # a tail document: its own bloom row
                    row_bytes = blocks[c] * _BLOCK_BYTES
                    at = offsets[c] + row_bytes * 8 * q + (column - 8 * q) * row_bytes
                    stride = 0
                    bit = 0
                    tail = True
                for r in range(plan_starts[p], plan_starts[p + 1]):
                    g = plan_rows[r]
                    base, a, b = _gram_probes(h2[g], nblocks)
                    present = True
                    for i in range(k):
                        position = np.int64(_probe_bit(base, a, b, np.uint64(i)))
                        if tail:
                            value = blooms[at + (position >> 3)] >> (position & 7)
                        else:
                            value = blooms[at + position * stride] >> bit
                        if not value & 1:
                            present = False
                            break
                    if present:
                        out[g, d >> 6] |= np.uint64(1) << np.uint64(d & 63)


@njit(inline="always")
def _operand(kind, index, leaves1, leaves2, facts, values):
    if kind == 0:
        return leaves1[index]
    if kind == 1:
        return leaves2[index]
    if kind == 2:
        return facts[index]
    return values[index]


@njit(nogil=True, cache=True)
def run_program(
    code,
    refs,
    emits,
    deps_start,
    deps,
    alive,
    leaves1,
    leaves2,
    facts,
    values,
    counters,
    masks,
    per_plan,
    out,
    nonempty,
):
    """query/program.py's code over packed bitmaps (64 documents a word), for the plans marked in
    `alive`: out[p] = result & (masks[p] if per_plan else masks[0]), nonempty[p] = it has a bit set.
    `values` (slots x words) and `counters` (AT_LEAST's counter bits x words) are scratch. The opcodes
    and operand kinds are program.py's; program.run_numpy is the same with numpy."""
    words = out.shape[1]
    n = code.shape[0]
    needed = np.zeros(n, dtype=np.bool_)
    every = True
    for p in range(alive.shape[0]):
        every &= alive[p] != 0
    if every:
        needed[:] = True
    else:
        for p in range(alive.shape[0]):
            if alive[p]:
                for d in range(deps_start[p], deps_start[p + 1]):
                    needed[deps[d]] = True
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    for i in range(n):
        if not needed[i]:
            continue
        op = code[i, 0]
        param = code[i, 1]
        value = values[code[i, 2]]
        first = code[i, 3]
        end = code[i, 4]
        if op == 0 or op == 1:  # AND, OR
            source = _operand(refs[first, 0], refs[first, 1], leaves1, leaves2, facts, values)
            for w in range(words):
                value[w] = source[w]
            for r in range(first + 1, end):
                source = _operand(refs[r, 0], refs[r, 1], leaves1, leaves2, facts, values)
                if op == 0:
                    for w in range(words):
                        value[w] &= source[w]
                else:
                    for w in range(words):
                        value[w] |= source[w]
        elif op == 3:  # NOT
            source = _operand(refs[first, 0], refs[first, 1], leaves1, leaves2, facts, values)
            for w in range(words):
                value[w] = ~source[w]
        elif op == 4:  # CONST
            fill = ones if param else np.uint64(0)
            for w in range(words):
                value[w] = fill
        else:  # AT_LEAST param
            width = 0
            while (1 << width) <= end - first:
                width += 1
            for j in range(width):
                for w in range(words):
                    counters[j, w] = 0
            for r in range(first, end):
                source = _operand(refs[r, 0], refs[r, 1], leaves1, leaves2, facts, values)
                for w in range(words):
                    carry = source[w]
                    j = 0
                    while carry and j < width:
                        sum_bit = counters[j, w]
                        counters[j, w] = sum_bit ^ carry
                        carry &= sum_bit
                        j += 1
            for w in range(words):
                greater = np.uint64(0)
                equal = ones
                for j in range(width - 1, -1, -1):
                    if (param >> j) & 1:
                        equal &= counters[j, w]
                    else:
                        greater |= equal & counters[j, w]
                value[w] = greater | equal
        for e in range(code[i, 5], code[i, 6]):
            p = emits[e]
            if not alive[p]:
                continue
            mask = masks[p] if per_plan else masks[0]
            target = out[p]
            seen = np.uint64(0)
            for w in range(words):
                bits = value[w] & mask[w]
                target[w] = bits
                seen |= bits
            nonempty[p] = seen != 0
