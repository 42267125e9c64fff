"""The node's self-check: is this box healthy right now?

Each check is a small function returning a :class:`Check` (name, ok, detail,
figures); :func:`run` runs the agent's set and says whether all passed. The
cloud runs it remotely (the ``selfcheck`` command, docs/fleet.md) and puts it
in every diagnostics bundle; ``aidc doctor`` (issue 6) is meant to grow from
the same functions, which take plain values so they run without an agent too.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: below this much free disk (MB) in the data dir, or this share of it, the check fails
MIN_FREE_MB = 256
MIN_FREE_FRACTION = 0.02


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def broker_connected(connected: bool, host: str = "", port: int = 0) -> Check:
    where = f"{host}:{port}" if host else "the broker"
    return Check("broker_connected", connected,
                 f"connected to {where}" if connected else f"not connected to {where}")


def workers_alive(status: dict[str, dict]) -> Check:
    """Every worker that should run (not deliberately stopped) is ready with a live pid."""
    bad = {k: w.get("state") for k, w in status.items()
           if w.get("state") != "stopped" and (w.get("state") != "ready" or not w.get("pid"))}
    running = sum(1 for w in status.values() if w.get("state") == "ready" and w.get("pid"))
    detail = (f"{running} worker(s) ready" if not bad else
              "not ready: " + ", ".join(f"{k} ({s})" for k, s in sorted(bad.items())))
    return Check("workers_alive", not bad, detail,
                 {"ready": running, "not_ready": bad,
                  "pids": {k: w.get("pid") for k, w in status.items()}})


def disk_free(path: Path, min_free_mb: float = MIN_FREE_MB,
              min_fraction: float = MIN_FREE_FRACTION) -> Check:
    try:
        du = shutil.disk_usage(path)
    except OSError as err:
        return Check("disk_free", False, f"cannot read the disk of {path}: {err}")
    free_mb = du.free / 2**20
    ok = free_mb >= min_free_mb and du.free >= min_fraction * du.total
    return Check("disk_free", ok,
                 f"{free_mb:.0f} MB free of {du.total / 2**20:.0f} MB in {path}"
                 + ("" if ok else f" (needs {min_free_mb:g} MB and {min_fraction:.0%})"),
                 {"path": str(path), "free_mb": round(free_mb, 1),
                  "total_mb": round(du.total / 2**20, 1)})


def db_integrity(db_path: Path) -> Check:
    """SQLite's ``PRAGMA quick_check`` on the node's database (read-only connection)."""
    t0 = time.monotonic()
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as err:
        return Check("db_integrity", False, f"{db_path}: {err}")
    ok = rows == ["ok"]
    return Check("db_integrity", ok, f"quick_check: {'ok' if ok else '; '.join(rows[:5])}",
                 {"path": str(db_path), "ms": round((time.monotonic() - t0) * 1000, 1)})


def outbox_flowing(stats: dict[str, int], pending: int, max_rows: int) -> Check:
    """The durable uplink is not filling up (past 90 % new samples stay home)."""
    ok = pending < 0.9 * max_rows
    return Check("outbox", ok, f"{pending} unsent of at most {max_rows}",
                 {"pending": pending, "max_rows": max_rows, **{k: v for k, v in stats.items()
                                                               if isinstance(v, int)}})


def run(agent: Any) -> dict[str, Any]:
    """Every check on a running :class:`~edge_node.agent.NodeAgent`."""
    cfg = agent.cfg
    checks = [
        broker_connected(agent.conn.connected.is_set(), cfg.mqtt.host, cfg.mqtt.port),
        workers_alive(agent.supervisor.status()),
        disk_free(cfg.data_dir),
        db_integrity(cfg.data_dir / "node.db"),
        outbox_flowing(agent.outbox.stats(), agent.outbox.pending(), cfg.outbox.max_rows),
    ]
    return {"ok": all(c.ok for c in checks), "ts": time.time(),
            "checks": [asdict(c) for c in checks]}
