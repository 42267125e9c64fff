"""A worker alive but making no progress (SIGSTOPped, deadlocked): fault ``worker_stuck``.

The probe pings every ready worker through its socket on a connection of its
own, with a deadline (:meth:`~edge_node.worker.client.WorkerClient.ping`): the
worker answers a ping on that connection's own thread, so a busy worker whose
inferences run (ONNX Runtime releases the GIL) still answers, and a stopped or
wedged one does not. A worker that misses ``strikes`` pings in a row is stuck;
the remedy SIGKILLs it (a stopped process cannot act on SIGTERM) and the
supervisor restarts it behind the same client, counted in its
``stuck_restarts`` and against its restart budget. The remedy waits (up to
``heal_wait_s``) for the worker to be ready again, so the episode's time is
until the app serves again.

Detection takes at most ``interval_s + strikes * (interval_s + ping_timeout_s)``
-- 10 s with the defaults; pings run in parallel, so many workers cost no more.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..worker.errors import WorkerException
from .base import Check, Finding, HealError

logger = logging.getLogger(__name__)


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (``T``: stopped, ``D``: in the kernel), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class WorkerStuckCheck(Check):
    name = "worker_stuck"

    def __init__(self, supervisor: Any, *, interval_s: float = 2.0, ping_timeout_s: float = 2.0,
                 strikes: int = 2, heal_wait_s: float = 30.0) -> None:
        if strikes < 1 or ping_timeout_s <= 0:
            raise ValueError("strikes must be >= 1 and ping_timeout_s > 0")
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.ping_timeout_s = ping_timeout_s
        self.strikes = strikes
        self.heal_wait_s = heal_wait_s
        self._missed: dict[str, tuple[int, int, float]] = {}  # key -> (pid, misses, first)
        self._pool: ThreadPoolExecutor | None = None  # pings in parallel, threads kept

    def _ping(self, key: str) -> str | None:
        """None when the worker answered, else why not."""
        client = self.supervisor.client(key)
        if client is None:
            return None  # stopped or failed meanwhile: not ours to judge
        try:
            client.ping(timeout=self.ping_timeout_s)
            return None
        except WorkerException as err:
            return str(err)

    def probe(self) -> Finding:
        ready = {k: st["pid"] for k, st in self.supervisor.status().items()
                 if st["state"] == "ready" and st["pid"]}
        for key in list(self._missed):
            if self._missed[key][0] != ready.get(key):  # gone or another process now
                del self._missed[key]
        if not ready:
            return Finding(self.name, True, "no ready workers")
        if len(ready) == 1:  # the common small site: no thread at all
            errors = {key: self._ping(key) for key in ready}
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ping")
            errors = dict(zip(ready, self._pool.map(self._ping, ready), strict=True))
        now = time.monotonic()
        stuck, late = {}, []
        for key, err in errors.items():
            pid = ready[key]
            if err is None:
                self._missed.pop(key, None)
                continue
            _, misses, first = self._missed.get(key, (pid, 0, now))
            misses += 1
            self._missed[key] = (pid, misses, first)
            info = {"pid": pid, "misses": misses, "error": err[:200],
                    "state": process_state(pid), "since_s": round(now - first, 1)}
            if misses >= self.strikes:
                stuck[key] = info
            else:
                late.append(key)
        if stuck:
            what = "; ".join(
                f"{k} (pid {i['pid']}{', stopped' if i['state'] == 'T' else ''}) missed "
                f"{i['misses']} pings of {self.ping_timeout_s:g}s" for k, i in stuck.items())
            return Finding(self.name, False, f"stuck workers: {what}", fault="worker_stuck",
                           data={"workers": stuck})
        detail = f"{len(ready)} workers answer a ping"
        if late:
            detail += f"; missed one ping: {', '.join(sorted(late))}"
        return Finding(self.name, True, detail, data={"late": sorted(late)})

    def heal(self, finding: Finding) -> str:
        return recycle_workers(
            self.supervisor, {
                key: (f"stuck: no answer to {info['misses']} pings of "
                      f"{self.ping_timeout_s:g}s"
                      + (" (process stopped)" if info.get("state") == "T" else ""),
                      info["pid"])
                for key, info in (finding.data.get("workers") or {}).items()},
            counter="stuck_restarts", kill=True, wait_s=self.heal_wait_s,
            forget=self._missed, what="killed and restarted")


def recycle_workers(supervisor: Any, workers: dict[str, tuple[str, int]], *, counter: str,
                    kill: bool = False, wait_s: float, forget: dict, what: str,
                    why: str = "") -> str:
    """The remedy of the worker checks: restart each of ``workers`` (key -> (reason,
    pid)) through :meth:`WorkerSupervisor.recycle` and wait until they are ready
    again; what was done. HealError when none could be restarted."""
    done, skipped = [], []
    for key, (reason, pid) in workers.items():
        if supervisor.recycle(key, reason, counter=counter, kill=kill, pid=pid):
            forget.pop(key, None)
            done.append(key)
        else:
            skipped.append(key)
    if not done:
        raise HealError(f"nothing to restart ({', '.join(skipped)} already gone or "
                        "restarting)")
    back = wait_ready(supervisor, done, wait_s)
    out = f"{what} {', '.join(done)}{why}"
    if set(back) != set(done):
        out += f"; not ready again after {wait_s:g}s: " + \
            ", ".join(k for k in done if k not in back)
    return out


def wait_ready(supervisor: Any, keys: list[str], timeout: float) -> list[str]:
    """The keys whose worker is ready again within ``timeout`` (a new process)."""
    deadline = time.monotonic() + timeout
    while True:
        st = supervisor.status()
        back = [k for k in keys if st.get(k, {}).get("state") == "ready"]
        if len(back) == len(keys) or time.monotonic() >= deadline:
            return back
        if any(st.get(k, {}).get("state") in ("failed", "stopped") for k in keys):
            return back
        time.sleep(0.05)
