"""Test hook: end this process with SIGKILL at a named point of a write, to prove what survives a crash.

The store calls `kill_point("publish.swapped")` and the like at the steps of every write (ingest,
publish, compaction, delete, dedup). With the environment variable SSPRY_KILL_AT="name[:count]" set,
the process kills itself with SIGKILL the count-th time (default: the first) it reaches that point;
`scripts/fault_harness.py` runs workloads so, then checks the forest. Unset (always, outside the fault
harness), `kill_point` is a function that does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

KILL_ENV = "SSPRY_KILL_AT"


def _no_op(name: str) -> None:
    """Not armed."""


def _armed(spec: str):
    target, _, count = spec.partition(":")
    remaining = [int(count or 1)]
    lock = threading.Lock()

    def kill_point(name: str) -> None:
        if name != target:
            return
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return kill_point


kill_point = _armed(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else _no_op
