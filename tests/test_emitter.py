"""A search's frames go from its worker thread to the event loop in bursts (server/service.py
`_Emitter`): in order, none lost, bounded by the client's room, and never held longer than about
HAND_OVER_S while the search goes on."""

from __future__ import annotations

import asyncio
import threading
import time

from sspry.server import service


def _run(worker, take_delay_s: float = 0.0) -> tuple[list, list[float]]:
    """Run `worker(emit)` on a thread against a real event loop that takes each frame (releasing room)
    as the Search handler does; returns the frames taken and when each was taken."""
    taken: list = []
    when: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue = asyncio.Queue()
        emit = service._Emitter(loop, frames, threading.Event())

        def work() -> None:
            try:
                worker(emit)
            finally:
                emit.hand_over()
                loop.call_soon_threadsafe(frames.put_nowait, None)

        running = loop.run_in_executor(None, work)
        while (frame := await frames.get()) is not None:
            emit.room.release()
            taken.append(frame)
            when.append(time.perf_counter())
            if take_delay_s:
                await asyncio.sleep(take_delay_s)
        await running

    asyncio.run(main())
    return taken, when


def test_a_quick_search_hands_its_frames_over_once_at_the_end() -> None:
    finished: list[float] = []

    def worker(emit) -> None:
        for i in range(5):
            emit(i)
        time.sleep(0.02)  # evaluation, shorter than HAND_OVER_S: nothing handed over meanwhile
        finished.append(time.perf_counter())

    taken, when = _run(worker)
    assert taken == list(range(5))
    assert min(when) >= finished[0]


def test_frames_wait_no_longer_than_the_hand_over_interval_while_a_search_goes_on() -> None:
    emitted: list[float] = []

    def worker(emit) -> None:
        for i in range(6):
            emitted.append(time.perf_counter())
            emit(i)
            time.sleep(service.HAND_OVER_S * 0.6)
        time.sleep(10 * service.HAND_OVER_S)

    taken, when = _run(worker)
    assert taken == list(range(6))
    # each frame is taken once a later one finds it old enough (about 2 * 0.6 * HAND_OVER_S later),
    # long before the worker ends (at least 10 * HAND_OVER_S later); the margin is for a busy machine
    assert all(w - e < 5 * service.HAND_OVER_S for e, w in zip(emitted[:4], when[:4], strict=True))


def test_more_frames_than_the_room_reach_a_slow_client_in_order() -> None:
    count = 3 * service.FRAMES_AHEAD + 5

    def worker(emit) -> None:
        for i in range(count):
            emit(i)  # held frames are handed over when the room runs out: no deadlock

    taken, _ = _run(worker, take_delay_s=0.001)
    assert taken == list(range(count))
