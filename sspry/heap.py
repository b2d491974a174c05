"""The C heap kept from shrinking after every YARA compilation (glibc only).

libyara takes about 4 MB of heap to compile even one rule, in small blocks, and frees it. glibc then
hands the top of its heap back to the kernel (its trim threshold is 128 KB until a large mmap'd block
is freed), so the next compilation faults about 1,000 fresh zeroed pages back in: 1.3 ms of the 1.8
ms yara-python takes to compile one rule, and most of what a server spends on a single-rule search
(it compiles every new source to check it; 100 synthetic rules over 100,000 documents: 6.4 ms at p50
on the server, 4.1 ms with these settings). `keep_heap` sets the thresholds glibc's own adjustment
tends to (blocks under 32 MB from the heap, its top kept up to 64 MB; any `mallopt` turns that
adjustment off, so both are set). The `sspry` command sets them for every subcommand; a library does
not change its host's allocator (a long-lived process that compiles rules often may call it).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit machines
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # what its adjustment sets with it


def keep_heap() -> bool:
    """Set the thresholds; False where the C library has no mallopt (macOS) or ignores it (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
