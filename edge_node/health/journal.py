"""The fault journal: every fault episode's steps in the ``faults`` table of node.db.

A row per step -- ``detected`` (kind, check, detail), ``healed`` (the remedy and the
seconds from detection), ``unhealed`` (why), ``repeated`` (a persisting fault
re-reported, with its count of probes) and ``noted`` (a fault met and handled at
start, e.g. a corrupt config replaced by the last good one). :meth:`summary` gives
per kind: counts, first/last detected, last healed, mean time to heal.

A row that is reported carries its events (``event``: ``fault_detected``,
``fault_healed``, ``fault_unhealed``), committed with the row; ``event_sent`` is set
once they are in the outbox. A kill -9 between the two leaves the row unsent, and
:meth:`FaultJournal.send_unsent` (at the agent's start) sends it then, under the
same msg_id (:func:`event_msg_id`, from the row's phase, kind, check and time, so a
copy of node.db restored gives the same ids): the outbox and the cloud keep it once.

The table is defined with the store's migrations (edge_node/store.py, m006, m010), so
the journal and the agent's store agree on it whichever opens node.db first.
"""

from __future__ import annotations

import inspect
import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

logger = logging.getLogger(__name__)

PHASES = ("detected", "healed", "unhealed", "repeated", "noted")

def event_msg_id(phase: str, kind: str, check: str, ts: float, type: str) -> str:
    """The msg_id of a journal row's event: from the row's content (its time to the
    microsecond), not its rowid, so it is the same when the row is sent again and
    after node.db was restored from a copy, and differs between rows of a node."""
    key = f"aidc:fault:{phase}:{kind}:{check}:{float(ts):.6f}:{type}"
    return uuid.uuid5(uuid.NAMESPACE_URL, key).hex


def _events(event: Any) -> list[dict]:
    if not event:
        return []
    evs = [event] if isinstance(event, dict) else list(event)
    return [{"type": str(e["type"]), "severity": str(e.get("severity") or "info"),
             "data": e.get("data") or {}} for e in evs]


def accepts_msg_id(emit_event: Callable[..., Any] | None) -> bool:
    """Whether ``emit_event`` takes ``msg_id=`` (NodeAgent.emit_event does; a test's
    stand-in may not)."""
    if emit_event is None:
        return False
    try:
        params = inspect.signature(emit_event).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "msg_id" or p.kind is p.VAR_KEYWORD for p in params)


def emit_events(emit_event: Callable[..., Any], phase: str, kind: str, check: str,
                ts: float, event: Any, with_msg_id: bool | None = None) -> None:
    """Hand a row's events to ``emit_event``, each under its msg_id; raises what it
    raises, and :class:`EventNotQueued` when it answers False (the outbox refused
    it): the row then stays unsent, sent again at the next start."""
    if with_msg_id is None:
        with_msg_id = accepts_msg_id(emit_event)
    for e in _events(event):
        kw: dict[str, Any] = {"severity": e["severity"], "data": e["data"]}
        if with_msg_id:
            kw["msg_id"] = event_msg_id(phase, kind, check, ts, e["type"])
        if emit_event(e["type"], **kw) is False:
            raise EventNotQueued(f"{e['type']} of {kind} not queued (the outbox refused it)")


class EventNotQueued(RuntimeError):
    """``emit_event`` said the event did not reach the outbox."""


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
             count: int = 1, data: dict | None = None, event: Any = None) -> "Row":
        """The row, committed with its events (unsent); returns what
        :meth:`send` needs."""
        if phase not in PHASES:
            raise ValueError(f"unknown journal phase {phase!r} (one of {', '.join(PHASES)})")
        evs = _events(event)
        row = {"ts": time.time() if ts is None else float(ts), "kind": kind,
               "check_name": check, "phase": phase, "detail": detail, "remedy": remedy,
               "seconds": None if seconds is None else round(seconds, 3), "count": count,
               "data": json.dumps(data or {}, default=str),
               "event": json.dumps(evs, default=str) if evs else None, "event_sent": None}
        with self._lock, self._db.conn:
            rowid = self._db["faults"].insert(row).last_pk
            if rowid and rowid % 100 == 0:  # bounded: the newest ``keep`` rows
                self.pruned += self._db.execute("DELETE FROM faults WHERE id <= ?",
                                                [rowid - self.keep]).rowcount
        return Row(rowid, phase, kind, check, row["ts"], evs)

    def detected(self, kind: str, check: str, detail: str, ts: float | None = None,
                 data: dict | None = None, event: Any = None) -> "Row":
        return self._add("detected", kind, check, ts=ts, detail=detail, data=data,
                         event=event)

    def healed(self, kind: str, check: str, remedy: str, seconds: float,
               ts: float | None = None, count: int = 1, data: dict | None = None,
               detected_at: float | None = None, detected_detail: str = "",
               event: Any = None, detected_event: Any = None) -> "Row":
        """``detected_at``: the episode's detection; its row is written again if it
        is missing (a remedy that restored node.db from a copy lost it), with
        ``detected_event`` unsent (its msg_id is the first one's: kept once); the
        returned row's ``rewritten`` is that row."""
        rewritten = None
        if detected_at is not None:
            with self._lock:
                seen = self._db.execute(
                    "SELECT 1 FROM faults WHERE phase = 'detected' AND kind = ? AND "
                    "check_name = ? AND ts = ?", [kind, check, detected_at]).fetchone()
            if not seen:
                rewritten = self._add("detected", kind, check, ts=detected_at,
                                      detail=detected_detail, data={"rewritten": True},
                                      event=detected_event)
        row = self._add("healed", kind, check, ts=ts, detail=remedy, remedy=remedy,
                        seconds=seconds, count=count, data=data, event=event)
        row.rewritten = rewritten
        return row

    def unhealed(self, kind: str, check: str, why: str, ts: float | None = None,
                 count: int = 1, data: dict | None = None, event: Any = None) -> "Row":
        return self._add("unhealed", kind, check, ts=ts, detail=why, count=count, data=data,
                         event=event)

    def repeated(self, kind: str, check: str, detail: str, count: int,
                 ts: float | None = None, event: Any = None) -> "Row":
        return self._add("repeated", kind, check, ts=ts, detail=detail, count=count,
                         event=event)

    def noted(self, kind: str, check: str, detail: str, remedy: str | None = None,
              ts: float | None = None, data: dict | None = None,
              event: Any = None) -> "Row":
        """A fault found and handled outside the monitor (at start): counts as
        detected, and as healed when a remedy is given (time to heal unknown)."""
        return self._add("noted", kind, check, ts=ts, detail=detail, remedy=remedy,
                         data=data, event=event)

    # -- the rows' events ------------------------------------------------------
    def mark_sent(self, row: "Row") -> None:
        """The row's events are in the outbox (matched on its content too: a row id
        of a node.db restored meanwhile may be another row's)."""
        if row.id is None:
            return
        with self._lock, self._db.conn:
            self._db.execute(
                "UPDATE faults SET event_sent = ? WHERE id = ? AND phase = ? AND kind = ? "
                "AND check_name IS ? AND ts = ?",
                [time.time(), row.id, row.phase, row.kind, row.check, row.ts])

    def send(self, row: "Row", emit_event: Callable[..., Any],
             with_msg_id: bool | None = None) -> None:
        """The row's events to ``emit_event`` under their msg_ids, then the row marked
        sent; an ``emit_event`` that raises leaves it unsent (and raises)."""
        emit_events(emit_event, row.phase, row.kind, row.check, row.ts, row.events,
                    with_msg_id)
        self.mark_sent(row)

    def unsent(self, limit: int = 100_000, kind: str | None = None,
               check: str | None = None) -> list["Row"]:
        """Rows whose events never reached the outbox, oldest first."""
        where, args = "event IS NOT NULL AND event_sent IS NULL", []
        if kind is not None:
            where, args = where + " AND kind = ?", [*args, kind]
        if check is not None:
            where, args = where + " AND check_name = ?", [*args, check]
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, phase, kind, check_name, ts, event FROM faults WHERE {where} "
                f"ORDER BY id LIMIT ?", [*args, int(limit)]).fetchall()
        out = []
        for rid, phase, kind_, check_, ts, event in rows:
            try:
                evs = _events(json.loads(event))
            except (ValueError, KeyError, TypeError):
                logger.warning("fault journal: row %s has an unreadable event", rid)
                continue
            out.append(Row(rid, phase, kind_, check_, ts, evs))
        return out

    def send_unsent(self, emit_event: Callable[..., Any], kind: str | None = None,
                    check: str | None = None) -> int:
        """Send the events of every row whose events never reached the outbox (the
        agent died between the row's commit and theirs), under the msg_ids they had;
        how many rows. A row whose emit fails stays unsent for the next call."""
        n, with_msg_id = 0, accepts_msg_id(emit_event)
        for row in self.unsent(kind=kind, check=check):
            try:
                self.send(row, emit_event, with_msg_id)
                n += 1
            except Exception:  # noqa: BLE001 - the next start sends it
                logger.exception("fault journal: events of row %s (%s %s) not sent",
                                 row.id, row.phase, row.kind)
        if n:
            logger.info("fault journal: sent the events of %d rows never queued", n)
        return n

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


class Row:
    """A journal row as its events need it."""

    __slots__ = ("id", "phase", "kind", "check", "ts", "events", "rewritten")

    def __init__(self, id: int | None, phase: str, kind: str, check: str, ts: float,
                 events: list[dict]) -> None:
        self.id, self.phase, self.kind, self.check = id, phase, kind, check
        self.ts, self.events = ts, events
        self.rewritten: Row | None = None  # healed(): the detected row written again

    def __repr__(self) -> str:
        return f"Row({self.id}, {self.phase}, {self.kind}, {self.check}, {self.ts})"
