"""Runs of hex digits: sidecar fields that let `[0-9a-fA-F]{32}`-like strings be searched.

A string with no gram certain to occur in its matches (a regex over a character class) costs a scan of
every file at verification, and YARA is at its slowest on exactly these: Yara-Rules' six `Big_Numbers`
rules (`/[0-9a-fA-F]{32}/ fullword wide ascii`) were half of its whole-bundle scanning time. What such
a string needs is a long enough run of its class, so each document keeps, for hex digits:

- `sspry.hex_run`: its longest run of hex digits;
- `sspry.hex_word`: its longest run of hex digits between fullword delimiters (a byte that is not an
  ASCII letter or digit, or the file's start or end: what YARA's `fullword` checks on both sides);
- `sspry.wide_hex_run`: its longest run of (hex digit, 0) pairs, as `wide` encodes them;
- `sspry.hex_word_lengths`: which lengths its fullword hex runs have, bit n for n (RUN_MIN <= n <
  LONG_WORD) and bit LONG_WORD for any longer: `/[0-9a-f]{32}/ fullword` needs a word of exactly 32,
  and many binaries hold 40-digit ones (a debug link's build ID) but none of 32.

Each is kept only from RUN_MIN up (0 below it), so the kernel need not see short runs inside a block;
the planner asks only for runs of RUN_MIN or more (query/runs.py). A document indexed before these
fields has none of them, and the planner keeps it a candidate.
"""

from __future__ import annotations

RUN_MIN = 8
HEX_RUN = "sspry.hex_run"
HEX_WORD = "sspry.hex_word"
WIDE_HEX_RUN = "sspry.wide_hex_run"
HEX_WORD_LENGTHS = "sspry.hex_word_lengths"
RUN_FIELDS = (HEX_RUN, HEX_WORD, WIDE_HEX_RUN, HEX_WORD_LENGTHS)
LONG_WORD = 62  # the bit of every fullword hex run this long or longer (int64 fields: bits 0-62)

HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
WORD_BYTES = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class RunCounter:
    """The run fields of one file, fed its bytes chunk by chunk (as extract.py reads them)."""

    def __init__(self) -> None:
        import numpy as np  # not at import: the planner reads this module's names without numba

        from sspry.features import kernels

        self.state = np.zeros(kernels.RUN_STATE, dtype=np.int64)
        self.state[kernels.RUN_CLEAN] = 1  # the file's start is a delimiter
        self._kernel = kernels.class_runs

    def update(self, chunk, first: int) -> None:
        self._kernel(chunk, first, self.state)

    def fields(self) -> dict[str, int]:
        from sspry.features import kernels

        s = self.state
        run = int(s[kernels.RUN_HEX])  # the file's end is a delimiter too
        hex_run = max(int(s[kernels.RUN_HEX_BEST]), run)
        last_word = run if s[kernels.RUN_CLEAN] else 0
        word = max(int(s[kernels.RUN_WORD_BEST]), last_word)
        wide = max(int(s[kernels.RUN_WIDE_BEST]), int(s[kernels.RUN_WIDE0]), int(s[kernels.RUN_WIDE1]))
        lengths = int(s[kernels.RUN_WORD_LENGTHS]) | _length_bit(last_word)
        return _fields(hex_run, word, wide, lengths)


def _kept(value: int) -> int:
    return value if value >= RUN_MIN else 0


def _length_bit(length: int) -> int:
    return 1 << min(length, LONG_WORD) if length >= RUN_MIN else 0


def _fields(hex_run: int, word: int, wide: int, lengths: int) -> dict[str, int]:
    values = (_kept(hex_run), _kept(word), _kept(wide), lengths)
    return dict(zip(RUN_FIELDS, values, strict=True))


def reference_fields(data: bytes) -> dict[str, int]:
    """The run fields computed byte by byte in plain Python (what tests hold the kernel to)."""
    hex_run = word = lengths = 0
    i = 0
    while i < len(data):
        if data[i] not in HEX_DIGITS:
            i += 1
            continue
        j = i
        while j < len(data) and data[j] in HEX_DIGITS:
            j += 1
        hex_run = max(hex_run, j - i)
        before_ok = i == 0 or data[i - 1] not in WORD_BYTES
        after_ok = j == len(data) or data[j] not in WORD_BYTES
        if before_ok and after_ok:
            word = max(word, j - i)
            lengths |= _length_bit(j - i)
        i = j
    wide = 0
    for start in range(2):
        count = 0
        for k in range(start, len(data) - 1, 2):
            count = count + 1 if data[k] in HEX_DIGITS and data[k + 1] == 0 else 0
            wide = max(wide, count)
    return _fields(hex_run, word, wide, lengths)
