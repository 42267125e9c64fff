"""The box short of memory: fault ``memory_low``.

The probe reads ``MemAvailable`` from ``/proc/meminfo`` (the kernel's estimate of
what can be had without swapping; the reader is injectable for tests). Below the
low mark -- ``low_mb``, or ``low_fraction`` of ``MemTotal`` when that is larger --
the node sheds load before the kernel's OOM killer picks a victim for it:

- on-site training and fine-tune jobs are paused (:meth:`Scheduler.pause
  <edge_node.scheduling.scheduler.Scheduler.pause>`: preempted with their
  checkpoint, none starts), since serving comes first;
- caches are trimmed (the ``trim`` callables: by default the agent's own freed
  heap given back to the kernel, ``gc`` + ``malloc_trim``);

and the episode's events are the alarm. The shedding holds until
``MemAvailable`` is back above the recover mark (the low mark times
``recover_factor``: no flapping around one line): the probe finds the check ok,
which closes the episode, and :meth:`MemoryPressureCheck.after_ok` lifts the
shedding (training resumes).
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .base import Check, Finding

logger = logging.getLogger(__name__)

MemInfo = Callable[[], dict[str, int]]


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as {field: kB}."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0])
    return out


def trim_own_heap() -> str:
    """Collect garbage and give the process's freed heap back to the kernel."""
    freed = gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return f"gc ({freed} objects) + malloc_trim"
    except (OSError, AttributeError):  # not glibc
        return f"gc ({freed} objects)"


class MemoryPressureCheck(Check):
    name = "memory_pressure"

    def __init__(self, *, scheduler: Any | None = None, low_mb: int = 256,
                 low_fraction: float = 0.05, recover_factor: float = 1.5,
                 interval_s: float = 5.0, meminfo: MemInfo = read_meminfo,
                 trim: Sequence[Callable[[], str]] = (trim_own_heap,)) -> None:
        if recover_factor < 1:
            raise ValueError("recover_factor must be >= 1")
        self.scheduler = scheduler
        self.low_mb, self.low_fraction = low_mb, low_fraction
        self.recover_factor = recover_factor
        self.interval_s = interval_s
        self.meminfo = meminfo
        self.trim = list(trim)
        self.shedding = False
        self.stats = {"sheds": 0, "recoveries": 0}

    def marks(self, info: dict[str, int]) -> tuple[int, int]:
        """(low, recover) marks in MB for this box."""
        total_mb = info.get("MemTotal", 0) >> 10
        low = max(self.low_mb, int(total_mb * self.low_fraction))
        return low, int(low * self.recover_factor)

    def probe(self) -> Finding:
        info = self.meminfo()
        if "MemAvailable" not in info:
            return Finding(self.name, True, "MemAvailable not reported by this kernel")
        avail = info["MemAvailable"] >> 10
        low, recover = self.marks(info)
        data = {"available_mb": avail, "total_mb": info.get("MemTotal", 0) >> 10,
                "low_mb": low, "recover_mb": recover, "shedding": self.shedding}
        if avail < low or (self.shedding and avail < recover):
            state = "below the low mark" if avail < low else "not yet above the recover mark"
            return Finding(self.name, False,
                           f"memory low: {avail} MB available, {state} ({low} MB / "
                           f"{recover} MB)", fault="memory_low", data=data)
        return Finding(self.name, True, f"{avail} MB available (low mark {low} MB)", data=data)

    def heal(self, finding: Finding) -> str:
        done = []
        if not self.shedding:
            self.shedding = True
            self.stats["sheds"] += 1
        if self.scheduler is not None:
            first = self.scheduler.pause(f"memory low ({finding.data.get('available_mb')} MB "
                                         "available)")
            done.append("training paused" if first else "training still paused")
        for fn in self.trim:
            try:
                done.append(str(fn()))
            except Exception as err:  # one failing trimmer must not stop the others
                logger.warning("memory pressure: trimming with %s failed: %s", fn, err)
                done.append(f"{getattr(fn, '__name__', fn)} failed: {err}")
        return "; ".join(done) or "nothing to shed"

    def after_ok(self, finding: Finding) -> None:
        """Pressure gone (above the recover mark): lift the shedding."""
        if self.shedding:
            self._lift()

    def _lift(self) -> None:
        self.shedding = False
        self.stats["recoveries"] += 1
        if self.scheduler is not None and self.scheduler.resume():
            logger.info("memory pressure gone: training resumed")
