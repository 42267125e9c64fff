"""How busy inference keeps a card: the scheduler's "headroom" signal.

Busy fraction of a card = CPU time the *inference workers* placed on it used
since the last call / (elapsed time x cores their slices hold). Training jobs
are other processes and are not counted, so a job cannot preempt itself.
(GPU cards: the same from the workers' CPU time for now; NVML per-process
utilisation is the better signal and comes with the GPU work.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .metrics import proc_usage


class InferenceLoad:
    def __init__(self, workers: Callable[[], dict[str, dict]],
                 slices: Callable[[], dict[str, dict]]) -> None:
        """``workers()``: supervisor status (key -> {"pid", ...}); ``slices()``:
        placement snapshot (card id -> {"slices": [{"app", "cores"|...}]})."""
        self.workers = workers
        self.slices = slices
        self._last: dict[str, tuple[float, float]] = {}  # card -> (t, cpu seconds)
        self._lock = threading.Lock()

    def _card_of(self) -> dict[str, tuple[str, float]]:
        """app name -> (card id, cores held)."""
        out: dict[str, tuple[str, float]] = {}
        for card_id, card in self.slices().items():
            for sl in (card or {}).get("slices", []):
                cores = sl.get("cores")
                n = len(cores) if isinstance(cores, list) else float(sl.get("core_share", 1.0))
                out[sl["app"]] = (card_id, max(float(n), 0.1))
        return out

    def __call__(self, card_id: str) -> float:
        placed = self._card_of()
        cpu, cores = 0.0, 0.0
        for key, w in self.workers().items():
            app = key.split("@", 1)[0]
            card, n = placed.get(app, ("cpu", 1.0))
            if card != card_id or not w.get("pid"):
                continue
            usage = proc_usage(w["pid"])
            if usage:
                cpu += usage[1]
            cores += n
        now = time.monotonic()
        with self._lock:
            last = self._last.get(card_id)
            self._last[card_id] = (now, cpu)
        if last is None or cores == 0:
            return 0.0
        dt = now - last[0]
        if dt <= 0:
            return 0.0
        return max(0.0, min(1.0, (cpu - last[1]) / (dt * cores)))
