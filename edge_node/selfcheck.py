"""The node's self-check: is this box healthy right now?

The agent's probes are checks of the health framework (edge_node/health): the
ones here watch the agent's own parts -- the broker link, the workers, the
outbox -- and take plain values or callables, so they also run without an agent
(``aidc edge doctor``). :func:`run` probes every check of a running agent (its
:class:`~edge_node.health.Monitor`, no remedy applied) in the shape the cloud's
``selfcheck`` command and the diagnostics bundle have always had:
``{"ok", "ts", "checks": [{"name", "ok", "detail", "fault", "data"}]}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .health.base import Check, Finding, HealError
from .health.db_integrity import quick_check

#: below this much free disk (MB) in the data dir, or this share of it, the check fails
MIN_FREE_MB = 256
MIN_FREE_FRACTION = 0.02
#: the outbox check fails past this share of its rows (past 90 % new samples stay home)
OUTBOX_FULL = 0.9


# -- probes on plain values -------------------------------------------------------
def broker_connected(connected: bool, host: str = "", port: int = 0) -> Finding:
    where = f"{host}:{port}" if host else "the broker"
    return Finding("broker_connected", connected,
                   f"connected to {where}" if connected else f"not connected to {where}",
                   fault=None if connected else "broker_unreachable",
                   data={"host": host, "port": port})


def workers_alive(status: dict[str, dict]) -> Finding:
    """Every worker that should run (not deliberately stopped) is ready with a live pid."""
    bad = {k: w.get("state") for k, w in status.items()
           if w.get("state") != "stopped" and (w.get("state") != "ready" or not w.get("pid"))}
    running = sum(1 for w in status.values() if w.get("state") == "ready" and w.get("pid"))
    detail = (f"{running} worker(s) ready" if not bad else
              "not ready: " + ", ".join(f"{k} ({s})" for k, s in sorted(bad.items())))
    return Finding("workers_alive", not bad, detail, fault="worker_down" if bad else None,
                   data={"ready": running, "not_ready": bad,
                         "pids": {k: w.get("pid") for k, w in status.items()}})


def disk_free(path: Path, min_free_mb: float = MIN_FREE_MB,
              min_fraction: float = MIN_FREE_FRACTION) -> Finding:
    """The free space of the data dir (the ``disk_space`` check also evicts)."""
    import shutil

    try:
        du = shutil.disk_usage(path)
    except OSError as err:
        return Finding("disk_free", False, f"cannot read the disk of {path}: {err}",
                       fault="disk_unreadable")
    free_mb = du.free / 2**20
    ok = free_mb >= min_free_mb and du.free >= min_fraction * du.total
    return Finding("disk_free", ok,
                   f"{free_mb:.0f} MB free of {du.total / 2**20:.0f} MB in {path}"
                   + ("" if ok else f" (needs {min_free_mb:g} MB and {min_fraction:.0%})"),
                   fault=None if ok else "disk_low",
                   data={"path": str(path), "free_mb": round(free_mb, 1),
                         "total_mb": round(du.total / 2**20, 1)})


def db_integrity(db_path: Path) -> Finding:
    """SQLite's ``PRAGMA quick_check`` on the node's database (read-only connection)."""
    t0 = time.monotonic()
    ok, rows = quick_check(db_path)
    return Finding("db_integrity", ok, f"quick_check: {'ok' if ok else '; '.join(rows[:5])}",
                   fault=None if ok else "db_corrupt",
                   data={"path": str(db_path), "ms": round((time.monotonic() - t0) * 1000, 1)})


def outbox_flowing(stats: dict[str, int], pending: int, max_rows: int) -> Finding:
    """The durable uplink is not filling up (past 90 % new samples stay home)."""
    ok = pending < OUTBOX_FULL * max_rows
    return Finding("outbox", ok, f"{pending} unsent of at most {max_rows}",
                   fault=None if ok else "outbox_full",
                   data={"pending": pending, "max_rows": max_rows,
                         **{k: v for k, v in stats.items() if isinstance(v, int)}})


# -- the same as health checks ------------------------------------------------------
class BrokerCheck(Check):
    """The MQTT link is up. The connection reconnects by itself (jittered backoff);
    the episode closes when it is back."""

    name = "broker_connected"
    interval_s = 5.0
    start_delay_s = 15.0

    def __init__(self, connected: Callable[[], bool], host: str = "", port: int = 0) -> None:
        self.connected, self.host, self.port = connected, host, port

    def probe(self) -> Finding:
        return broker_connected(bool(self.connected()), self.host, self.port)

    def heal(self, finding: Finding) -> str:
        raise HealError("the connection reconnects by itself with jittered backoff; "
                        "the outbox keeps every fact meanwhile")


class WorkersCheck(Check):
    """Every model worker that should run is ready. Crashed workers are restarted by
    the supervisor (budget) and, past it, started afresh by the reconciler.

    A worker starting or restarting is a fault only when it stays so for
    ``grace_s`` (an upgrade starts a new worker every time); ``failed`` is one at once.
    """

    name = "workers_alive"
    interval_s = 5.0
    start_delay_s = 30.0

    def __init__(self, status: Callable[[], dict[str, dict]], grace_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.status, self.grace_s, self.clock = status, grace_s, clock
        self._since: dict[str, float] = {}  # worker -> when first seen not ready

    def probe(self) -> Finding:
        status = self.status()
        f = workers_alive(status)
        now = self.clock()
        bad = f.data["not_ready"]
        self._since = {k: self._since.get(k, now) for k in bad}
        waiting = {k: s for k, s in bad.items()
                   if s in ("starting", "restarting") and now - self._since[k] < self.grace_s}
        if f.ok or len(waiting) < len(bad):
            return f
        return Finding(self.name, True,
                       f"{f.data['ready']} worker(s) ready; starting: "
                       + ", ".join(f"{k} ({s})" for k, s in sorted(waiting.items())),
                       data={**f.data, "starting": waiting})

    def heal(self, finding: Finding) -> str:
        raise HealError("the supervisor restarts a crashed worker itself (within its "
                        "budget; past it the reconciler starts it afresh)")


class OutboxCheck(Check):
    """The outbox is not filling up; the remedy resends what waits for an ack now."""

    name = "outbox"
    interval_s = 30.0

    def __init__(self, stats: Callable[[], dict], pending: Callable[[], int], max_rows: int,
                 retry_now: Callable[[], None] | None = None,
                 connected: Callable[[], bool] | None = None) -> None:
        self.stats, self.pending, self.max_rows = stats, pending, max_rows
        self.retry_now, self.connected = retry_now, connected

    def probe(self) -> Finding:
        return outbox_flowing(self.stats(), self.pending(), self.max_rows)

    def heal(self, finding: Finding) -> str:
        if self.connected is not None and not self.connected():
            raise HealError("the broker is unreachable: the outbox keeps the messages "
                            "until it is back (new samples stay home past 90 %)")
        if self.retry_now is None:
            raise HealError("no automatic remedy")
        self.retry_now()
        return "resent every message waiting for an ack"


# -- reports ---------------------------------------------------------------------------
def entry(f: Finding) -> dict[str, Any]:
    return {"name": f.check, "ok": f.ok, "detail": f.detail, "fault": f.fault,
            "data": f.data}


def report(findings: Iterable[Finding], legacy: bool = True) -> dict[str, Any]:
    """``{"ok", "ts", "checks": [...]}``; with ``legacy`` the ``disk_space`` finding is
    also given as ``disk_free``, its name before the health framework."""
    checks = []
    for f in findings:
        if legacy and f.check == "disk_space":
            checks.append({**entry(f), "name": "disk_free"})
        checks.append(entry(f))
    return {"ok": all(c["ok"] for c in checks), "ts": time.time(), "checks": checks}


def run(agent: Any) -> dict[str, Any]:
    """Every check of a running :class:`~edge_node.agent.NodeAgent`, probed now."""
    return report(agent.health.run_all(heal=False))
