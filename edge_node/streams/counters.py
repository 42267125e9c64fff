"""The capture process's counters, in shared memory the agent reads without asking.

One int64 array per stream (``multiprocessing.Array``, no lock: each cell has
one writer, the capture process). It outlives a crashed capture process, so
nothing it counted is lost, and the agent's watchdog reads its heartbeat.
"""

from __future__ import annotations

import time

#: cells written by the capture process
NAMES = (
    "captured",  # frames kept after decimation (each goes to the queue or is dropped)
    "dropped_capture",  # kept frames dropped because the agent's queue was full
    "grabbed",  # frames read from the source, kept or not
    "skipped",  # frames grabbed but not decoded/kept (decimation to the target fps)
    "garbage",  # frames the source sent that could not be decoded
    "read_failures",  # reads that returned nothing
    "open_failures",  # attempts to open the source that failed
    "stalls",  # reconnects because no frame came within stall_timeout
    "reconnects",  # times the source was reopened after a failure
    "status_dropped",  # status messages not sent because their queue was full
    "ring_gen",  # generation of the current shared-memory ring
    "heartbeat_ms",  # CLOCK_MONOTONIC ms of the loop's last sign of life
    "last_frame_ms",  # CLOCK_MONOTONIC ms of the last kept frame
)
INDEX = {name: i for i, name in enumerate(NAMES)}
#: the counters reported in stats (the rest are bookkeeping)
REPORTED = NAMES[:10]


def now_ms() -> int:
    return int(time.monotonic() * 1000)


class Counters:
    """Named access to the shared array ``cells`` (any ``'q'`` sequence works in tests)."""

    def __init__(self, cells) -> None:
        self.cells = cells

    def add(self, name: str, n: int = 1) -> None:
        self.cells[INDEX[name]] += n

    def set(self, name: str, value: int) -> None:
        self.cells[INDEX[name]] = value

    def get(self, name: str) -> int:
        return int(self.cells[INDEX[name]])

    def beat(self) -> None:
        self.cells[INDEX["heartbeat_ms"]] = now_ms()

    def snapshot(self) -> dict[str, int]:
        values = list(self.cells)
        return {name: int(values[i]) for i, name in enumerate(NAMES)}
