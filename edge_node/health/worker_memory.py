"""A worker over its slice's memory quota: fault ``worker_over_quota``.

A CPU slice's ``memory_mb`` is its worker's host memory quota
(:func:`~edge_node.resources.slices.worker_settings`; the supervisor shows it as
``memory_budget_mb``). The probe reads each ready worker's private resident
memory -- ``RssAnon`` in ``/proc/<pid>/status`` (:func:`~edge_node.worker.proc.private_rss_mb`;
the shared library pages every worker maps are not the slice's) -- and a worker
over its quota in ``strikes`` readings in a row (one spike is not a fault) is
restarted: SIGTERM, up to the supervisor's stop timeout, then SIGKILL, and a
fresh process behind the same client, counted in ``memory_restarts`` and
against the restart budget (:meth:`~edge_node.worker.supervisor.WorkerSupervisor.recycle`).
A worker that keeps growing past its quota thus ends ``failed`` with the reason,
not in an endless loop.

With this check running, the supervisor is built with ``memory_poll=None`` so
that one reading alone never restarts a worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..worker.proc import private_rss_mb
from .base import Check, Finding
from .worker_stuck import recycle_workers


class WorkerMemoryCheck(Check):
    name = "worker_memory"

    def __init__(self, supervisor: Any, *, interval_s: float = 2.0, strikes: int = 3,
                 heal_wait_s: float = 30.0,
                 rss_mb: Callable[[int], int | None] = private_rss_mb) -> None:
        if strikes < 1:
            raise ValueError("strikes must be >= 1")
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.strikes = strikes
        self.heal_wait_s = heal_wait_s
        self.rss_mb = rss_mb
        self._over: dict[str, tuple[int, int]] = {}  # key -> (pid, readings over in a row)

    def probe(self) -> Finding:
        status = self.supervisor.status()
        seen, over, rising = {}, {}, []
        for key, st in status.items():
            pid, quota = st.get("pid"), st.get("memory_budget_mb")
            if st.get("state") != "ready" or not pid or not quota:
                continue
            rss = self.rss_mb(pid)
            if rss is None:
                continue
            seen[key] = (rss, quota)
            if rss <= quota:
                self._over.pop(key, None)
                continue
            old_pid, n = self._over.get(key, (pid, 0))
            n = n + 1 if old_pid == pid else 1
            self._over[key] = (pid, n)
            if n >= self.strikes:
                over[key] = {"pid": pid, "rss_mb": rss, "quota_mb": quota, "readings": n}
            else:
                rising.append(f"{key} {rss}/{quota} MB ({n}/{self.strikes})")
        for key in [k for k in self._over if k not in seen]:
            del self._over[key]
        if over:
            what = "; ".join(f"{k}: {i['rss_mb']} MB > {i['quota_mb']} MB in {i['readings']} "
                             "readings" for k, i in over.items())
            return Finding(self.name, False, f"workers over their memory quota: {what}",
                           fault="worker_over_quota", data={"workers": over})
        detail = f"{len(seen)} workers within their memory quota"
        if rising:
            detail += "; over once: " + ", ".join(rising)
        return Finding(self.name, True, detail,
                       data={"workers": {k: {"rss_mb": r, "quota_mb": q}
                                         for k, (r, q) in seen.items()}})

    def heal(self, finding: Finding) -> str:
        return recycle_workers(
            self.supervisor, {
                key: (f"memory quota exceeded: {i['rss_mb']} MB > {i['quota_mb']} MB "
                      f"in {i['readings']} readings", i["pid"])
                for key, i in (finding.data.get("workers") or {}).items()},
            counter="memory_restarts", wait_s=self.heal_wait_s, forget=self._over,
            what="restarted", why=" (over quota)")
