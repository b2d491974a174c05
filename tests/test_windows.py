"""Window scores computed in byte lanes (query/windows.py) equal the plain per-window definition."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sspry.query.windows import Lanes, best, weight


def plain_scores(raw: bytes, n: int) -> list[int]:
    return [sum(map(weight, raw[s : s + n])) + len(set(raw[s : s + n])) for s in range(len(raw) - n + 1)]


# bytes from a small alphabet repeat often, as in real strings; and any bytes
RAW = st.one_of(
    st.binary(min_size=1, max_size=300), st.lists(st.sampled_from(b"\x00\xffaA0 \x90\xcc\x01z")).map(bytes)
)


@given(RAW, st.integers(3, 8))
def test_lane_scores_equal_per_window_scores(raw: bytes, n: int) -> None:
    lanes = Lanes(raw)
    if len(raw) >= n:
        assert list(lanes.scores(n)) == plain_scores(raw, n)
    for m in range(3, 9):  # one Lanes serves every gram size, in any order
        if len(raw) >= m:
            assert list(lanes.scores(m)) == plain_scores(raw, m)


@given(st.binary(max_size=60), st.integers(0, 20))
def test_best_windows_are_the_highest_scores_earliest_first(scores: bytes, k: int) -> None:
    ranked = sorted(range(len(scores)), key=lambda s: (-scores[s], s))[:k]
    assert best(scores, k) == sorted(ranked)
