"""The fault journal: every fault episode's steps in the ``faults`` table of node.db.

A row per step -- ``detected`` (kind, check, detail), ``healed`` (the remedy and the
seconds from detection), ``unhealed`` (why), ``repeated`` (a persisting fault
re-reported, with its count of probes) and ``noted`` (a fault met and handled at
start, e.g. a corrupt config replaced by the last good one). :meth:`summary` gives
per kind: counts, first/last detected, last healed, mean time to heal.

The table is defined with the store's migrations (edge_node/store.py, m006), so the
journal and the agent's store agree on it whichever opens node.db first.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

PHASES = ("detected", "healed", "unhealed", "repeated", "noted")


class FaultJournal:
    """Thread-safe; ``path=None`` keeps the journal in memory (doctor with no node.db).
    The newest ``keep`` rows are kept (older ones pruned, counted in ``pruned``)."""

    def __init__(self, path: Path | str | None, keep: int = 20_000) -> None:
        if keep < 10:
            raise ValueError(f"a fault journal keeps at least 10 rows, not {keep}")
        self.keep = keep
        self.pruned = 0
        from ..store import connect, migrations  # the one definition of the table

        self.path = Path(path) if path is not None else None
        if self.path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
        self._db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        with self._lock:
            migrations.apply(self._db)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.conn.close()
            except sqlite3.Error:
                pass

    # -- writing -------------------------------------------------------------
    def _add(self, phase: str, kind: str, check: str, *, ts: float | None = None,
             detail: str = "", remedy: str | None = None, seconds: float | None = None,
             count: int = 1, data: dict | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown journal phase {phase!r} (one of {', '.join(PHASES)})")
        row = {"ts": time.time() if ts is None else ts, "kind": kind, "check_name": check,
               "phase": phase, "detail": detail, "remedy": remedy,
               "seconds": None if seconds is None else round(seconds, 3), "count": count,
               "data": json.dumps(data or {}, default=str)}
        with self._lock, self._db.conn:
            rowid = self._db["faults"].insert(row).last_pk
            if rowid and rowid % 100 == 0:  # bounded: the newest ``keep`` rows
                self.pruned += self._db.execute("DELETE FROM faults WHERE id <= ?",
                                                [rowid - self.keep]).rowcount

    def detected(self, kind: str, check: str, detail: str, ts: float | None = None,
                 data: dict | None = None) -> None:
        self._add("detected", kind, check, ts=ts, detail=detail, data=data)

    def healed(self, kind: str, check: str, remedy: str, seconds: float,
               ts: float | None = None, count: int = 1, data: dict | None = None,
               detected_at: float | None = None, detected_detail: str = "") -> None:
        """``detected_at``: the episode's detection; its row is written again if it
        is missing (a remedy that restored node.db from a copy lost it)."""
        if detected_at is not None:
            with self._lock:
                seen = self._db.execute(
                    "SELECT 1 FROM faults WHERE phase = 'detected' AND kind = ? AND "
                    "check_name = ? AND ts = ?", [kind, check, detected_at]).fetchone()
            if not seen:
                self._add("detected", kind, check, ts=detected_at, detail=detected_detail,
                          data={"rewritten": True})
        self._add("healed", kind, check, ts=ts, detail=remedy, remedy=remedy, seconds=seconds,
                  count=count, data=data)

    def unhealed(self, kind: str, check: str, why: str, ts: float | None = None,
                 count: int = 1, data: dict | None = None) -> None:
        self._add("unhealed", kind, check, ts=ts, detail=why, count=count, data=data)

    def repeated(self, kind: str, check: str, detail: str, count: int,
                 ts: float | None = None) -> None:
        self._add("repeated", kind, check, ts=ts, detail=detail, count=count)

    def noted(self, kind: str, check: str, detail: str, remedy: str | None = None,
              ts: float | None = None, data: dict | None = None) -> None:
        """A fault found and handled outside the monitor (at start): counts as
        detected, and as healed when a remedy is given (time to heal unknown)."""
        self._add("noted", kind, check, ts=ts, detail=detail, remedy=remedy, data=data)

    # -- reading -------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: detected (episodes), healed, unhealed, first/last detected,
        last healed, mean seconds to heal."""
        q = """
        SELECT kind,
               SUM(phase IN ('detected', 'noted')) AS detected,
               SUM(phase = 'healed' OR (phase = 'noted' AND remedy IS NOT NULL)) AS healed,
               SUM(phase = 'unhealed') AS unhealed,
               MIN(CASE WHEN phase IN ('detected', 'noted') THEN ts END) AS first_detected,
               MAX(CASE WHEN phase IN ('detected', 'noted') THEN ts END) AS last_detected,
               MAX(CASE WHEN phase = 'healed' OR (phase = 'noted' AND remedy IS NOT NULL)
                        THEN ts END) AS last_healed,
               AVG(CASE WHEN phase = 'healed' THEN seconds END) AS mean_time_to_heal_s,
               MAX(CASE WHEN phase IN ('repeated', 'unhealed', 'healed') THEN count END)
                   AS max_count
        FROM faults GROUP BY kind ORDER BY kind"""
        with self._lock:
            cur = self._db.execute(q)
            cols = [c[0] for c in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        out = {}
        for r in rows:
            kind = r.pop("kind")
            if r["mean_time_to_heal_s"] is not None:
                r["mean_time_to_heal_s"] = round(r["mean_time_to_heal_s"], 3)
            for k in ("detected", "healed", "unhealed", "max_count"):
                r[k] = int(r[k] or 0)
            out[kind] = r
        return out

    def recent(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE kind = ?", [kind]) if kind else ("", [])
        with self._lock:
            cur = self._db.execute(
                f"SELECT id, ts, kind, check_name, phase, detail, remedy, seconds, count, data "
                f"FROM faults {where} ORDER BY id DESC LIMIT ?", [*args, int(limit)])
            cols = [c[0] for c in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        for r in rows:
            r["check"] = r.pop("check_name")
            try:
                r["data"] = json.loads(r["data"] or "{}")
            except ValueError:
                r["data"] = {}
        return rows

    def stats(self) -> dict[str, Any]:
        """The block for the node's stats and metrics."""
        s = self.summary()
        return {"kinds": s,
                "detected": sum(v["detected"] for v in s.values()),
                "healed": sum(v["healed"] for v in s.values()),
                "unhealed": sum(v["unhealed"] for v in s.values())}
