"""Compiled (numba, GIL-free) loops over file bytes: the only per-byte work in sspry.

Each kernel consumes one chunk and carries a small `state` array across chunks, so a file can be fed
whole or streamed: state = [rolling window, bytes seen, previous gram, previous-gram-valid].
Grams are the n bytes ending at each position, packed little-endian into a uint64 (n <= 8), hashed with
MurmurHash3 x64_128 (seed 0); `sizing.py` documents how the two hash halves are used and
`tests/test_kernels.py` checks every kernel against mmh3, datasketch and bitarray.
A run of identical grams (zero padding, for instance) is hashed once: HLL and bloom inserts are idempotent.
The gram size is a compile-time constant (`literally`) so the hash unrolls; compiled code is cached on disk.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

STATE_WORDS = 4
_BATCH = 1 << 14
_PREFETCH_AHEAD = 16


def new_state() -> np.ndarray:
    return np.zeros(STATE_WORDS, dtype=np.uint64)


@intrinsic
def _ctlz64(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """LLVM prefetch (for write, high locality) of array[index]."""
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(function, [pointer, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _rotl64(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(inline="always")
def _fmix64(k):
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xFF51AFD7ED558CCD)
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xC4CEB9FE1A85EC53)
    k ^= k >> np.uint64(33)
    return k


@njit(inline="always")
def murmur3_x64_128(gram, n):
    """MurmurHash3_x64_128(seed=0) of an n-byte key (n <= 8) packed little-endian in `gram`."""
    h1 = np.uint64(0)
    h2 = np.uint64(0)
    k1 = gram * np.uint64(0x87C37B91114253D5)
    k1 = _rotl64(k1, 31)
    k1 *= np.uint64(0x4CF5AD432745937F)
    h1 ^= k1
    h1 ^= np.uint64(n)
    h2 ^= np.uint64(n)
    h1 += h2
    h2 += h1
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    h1 += h2
    h2 += h1
    return h1, h2


@njit(nogil=True, cache=True)
def byte_histogram(chunk, hist):
    for i in range(chunk.shape[0]):
        hist[chunk[i]] += 1


@njit(inline="always")
def _hll_loop(chunk, n, state, reg):
    shift = np.uint64(64 - 8 * n)
    w = state[0]
    seen = state[1]
    prev = state[2]
    has_prev = state[3]
    for i in range(chunk.shape[0]):
        w = (w >> np.uint64(8)) | (np.uint64(chunk[i]) << np.uint64(56))
        seen += np.uint64(1)
        if seen < np.uint64(n):
            continue
        gram = w >> shift
        if has_prev and gram == prev:
            continue
        prev = gram
        has_prev = np.uint64(1)
        h1, _ = murmur3_x64_128(gram, n)
        index = h1 & np.uint64(16383)
        rank = np.int8(_ctlz64(h1 >> np.uint64(14)) - np.uint64(13))
        reg[index] = max(reg[index], rank)
    state[0] = w
    state[1] = seen
    state[2] = prev
    state[3] = has_prev


@njit(inline="always")
def _bloom_loop(chunk, n, k, nblocks, bloom, state):
    shift = np.uint64(64 - 8 * n)
    blocks = np.uint64(nblocks)
    w = state[0]
    seen = state[1]
    prev = state[2]
    has_prev = state[3]
    hashes = np.empty(_BATCH, dtype=np.uint64)
    i = 0
    while i < chunk.shape[0]:
        # Hash a batch of grams first, then set their bits while prefetching the blocks a few grams
        # ahead: the bit-setting is bound by cache misses, and this lets them overlap.
        end = min(chunk.shape[0], i + _BATCH)
        count = 0
        for j in range(i, end):
            w = (w >> np.uint64(8)) | (np.uint64(chunk[j]) << np.uint64(56))
            seen += np.uint64(1)
            if seen < np.uint64(n):
                continue
            gram = w >> shift
            if has_prev and gram == prev:
                continue
            prev = gram
            has_prev = np.uint64(1)
            _, h2 = murmur3_x64_128(gram, n)
            hashes[count] = h2
            count += 1
        for q in range(count):
            if q + _PREFETCH_AHEAD < count:
                ahead = hashes[q + _PREFETCH_AHEAD]
                _prefetch(bloom, (((ahead >> np.uint64(32)) * blocks) >> np.uint64(32)) << np.uint64(6))
            h2 = hashes[q]
            base = (((h2 >> np.uint64(32)) * blocks) >> np.uint64(32)) << np.uint64(9)
            a = h2 & np.uint64(511)
            b = ((h2 >> np.uint64(9)) & np.uint64(511)) | np.uint64(1)
            for probe in range(k):
                bit = base + ((a + np.uint64(probe) * b) & np.uint64(511))
                bloom[bit >> np.uint64(3)] |= np.uint8(1) << np.uint8(bit & np.uint64(7))
        i = end
    state[0] = w
    state[1] = seen
    state[2] = prev
    state[3] = has_prev


# The gram size must be a compile-time constant for the hash to unroll: one inlined copy per size.
@njit(nogil=True, cache=True)
def hll_update(chunk, n, state, reg):
    """Add every n-gram of `chunk` to HyperLogLog++ registers `reg` (int8[16384], p = 14)."""
    if n == 3:
        _hll_loop(chunk, 3, state, reg)
    elif n == 4:
        _hll_loop(chunk, 4, state, reg)
    elif n == 5:
        _hll_loop(chunk, 5, state, reg)
    elif n == 6:
        _hll_loop(chunk, 6, state, reg)
    elif n == 7:
        _hll_loop(chunk, 7, state, reg)
    else:
        _hll_loop(chunk, 8, state, reg)


@njit(nogil=True, cache=True)
def bloom_insert(chunk, n, k, nblocks, bloom, state):
    """Set the k probe bits of every n-gram of `chunk` in a blocked bloom of `nblocks` 512-bit blocks."""
    if n == 3:
        _bloom_loop(chunk, 3, k, nblocks, bloom, state)
    elif n == 4:
        _bloom_loop(chunk, 4, k, nblocks, bloom, state)
    elif n == 5:
        _bloom_loop(chunk, 5, k, nblocks, bloom, state)
    elif n == 6:
        _bloom_loop(chunk, 6, k, nblocks, bloom, state)
    elif n == 7:
        _bloom_loop(chunk, 7, k, nblocks, bloom, state)
    else:
        _bloom_loop(chunk, 8, k, nblocks, bloom, state)
