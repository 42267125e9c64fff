"""The node's local SQLite store: installed apps, the twin, results and samples.

The agent is the one writer of these tables (under one lock); the outbox owns
its own table in the same file. WAL is on so readers (the web UI, the CLI)
never block the writer. Every fact is written here before it goes anywhere.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("edge_node.store")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["kv"].create({"key": str, "value": str}, pk="key")
    db["installed"].create(
        {"name": str, "version": str, "sha256": str, "app_dir": str, "installed_at": float},
        pk="sha256",
    )
    db["results"].create(
        {"id": int, "ts": float, "app": str, "version": str, "label": str,
         "score": float, "source": str},
        pk="id",
    )
    db["results"].create_index(["app", "ts"])
    db["samples"].create(
        {"sample_id": str, "created_at": float, "app": str, "version": str, "reason": str,
         "input_type": str, "input_path": str, "prediction": str, "scores": str,
         "label": str, "source": str, "msg_id": str},
        pk="sample_id",
    )
    db["samples"].create_index(["app", "created_at"])


@migrations()
def m002_samples_queued(db: sqlite_utils.Database) -> None:
    """When the sample entered the outbox (or was marked local-only): NULL means
    it still has to be queued, so a restart requeues only what never was."""
    db["samples"].add_column("queued", float)
    db.execute("UPDATE samples SET queued = created_at")


@migrations()
def m003_sample_labelling(db: sqlite_utils.Database) -> None:
    """Labelling on site: how useful a sample is (queue order), its size (quota),
    whether it is kept apart for judging, who labelled it when, and what left."""
    for col, typ in (("usefulness", float), ("nbytes", int), ("heldout", int),
                     ("labelled_at", float), ("labelled_by", str), ("label_source", str),
                     ("shared", str)):
        db["samples"].add_column(col, typ)
    db.execute("UPDATE samples SET usefulness = 0, nbytes = 0, heldout = 0")
    db["samples"].create_index(["app", "label", "usefulness"])


@migrations()
def m004_finetune_runs(db: sqlite_utils.Database) -> None:
    """Fine-tunes on site: one row per run, from the request to its verdict
    (edge_node/adapt.py); ``lineage`` and ``metrics`` are JSON."""
    db["finetune_runs"].create(
        {"run_id": str, "app": str, "state": str, "reason": str, "created_at": float,
         "updated_at": float, "requested_by": str, "base_version": str, "base_sha256": str,
         "job_id": str, "version": str, "model_sha256": str, "app_dir": str,
         "metrics": str, "lineage": str},
        pk="run_id", not_null={"app", "state"})
    db["finetune_runs"].create_index(["app", "created_at"])


@migrations()
def m005_alarms(db: sqlite_utils.Database) -> None:
    """Alarms raised by rules on camera results (edge_node/alarms.py): state, who did
    what when (``history``, JSON), the evidence frame (a PNG file) and the result
    (JSON), the sample a false alarm became."""
    db["alarms"].create(
        {"alarm_id": str, "rule": str, "stream": str, "app": str, "version": str,
         "severity": str, "state": str, "label": str, "score": float, "result": str,
         "raised_at": float, "last_seen": float, "frames": int, "evidence_path": str,
         "evidence_ts": float, "acknowledged_at": float, "acknowledged_by": str,
         "closed_at": float, "closed_by": str, "note": str, "correct_label": str,
         "sample_id": str, "history": str, "updated_at": float},
        pk="alarm_id", not_null={"rule", "stream", "app", "state"})
    db["alarms"].create_index(["state", "raised_at"])
    db["alarms"].create_index(["raised_at"])


@migrations()
def m006_faults(db: sqlite_utils.Database) -> None:
    """The fault journal (edge_node/health/journal.py): one row per step of a fault
    episode -- ``detected``, ``healed``, ``unhealed``, ``repeated`` (a persisting
    fault re-reported) or ``noted`` (a fault handled at start, before the monitor
    runs); ``data`` is JSON."""
    db["faults"].create(
        {"id": int, "ts": float, "kind": str, "check_name": str, "phase": str,
         "detail": str, "remedy": str, "seconds": float, "count": int, "data": str},
        pk="id", not_null={"ts", "kind", "phase"})
    db["faults"].create_index(["kind", "ts"])
    db["faults"].create_index(["ts"])


@migrations()
def m007_label_sent(db: sqlite_utils.Database) -> None:
    """When a label given on site was handed to the outbox (its ``sample_labelled``
    event): NULL for a label not yet queued, so a kill -9 between the label's commit
    and the event's loses nothing (:meth:`edge_node.labelling.Labeller.send_unsent`).
    Labels set before were sent then."""
    db["samples"].add_column("label_sent", float)
    db.execute("UPDATE samples SET label_sent = coalesce(labelled_at, 0) "
               "WHERE label IS NOT NULL")


@migrations()
def m008_alarm_events_sent(db: sqlite_utils.Database) -> None:
    """How many of an alarm's ``history`` entries have had their event handed to the
    outbox: fewer than the entries after a kill -9 between a transition's commit and
    its event's, sent at the next start (:meth:`edge_node.alarms.Alarms.start`).
    Alarms of before were sent then."""
    db["alarms"].add_column("events_sent", int)
    db.execute("UPDATE alarms SET events_sent = json_array_length(coalesce(history, '[]'))")


@migrations()
def m009_finetune_event_sent(db: sqlite_utils.Database) -> None:
    """The state of a fine-tune run whose event was handed to the outbox: another
    than ``state`` after a kill -9 between the run's commit and its event's, sent
    at the next start (:meth:`edge_node.adapt.SiteLearning.recover`). Runs of before
    were sent then."""
    db["finetune_runs"].add_column("event_sent", str)
    db.execute("UPDATE finetune_runs SET event_sent = state")


@migrations()
def m010_fault_events(db: sqlite_utils.Database) -> None:
    """The events a fault journal row stands for (``event``: JSON, a list of
    ``{type, severity, data}``) and when they were handed to the outbox
    (``event_sent``): NULL after a kill -9 between the row's commit and its events',
    sent at the next start (:meth:`edge_node.health.journal.FaultJournal.send_unsent`).
    Rows of before were sent then."""
    db["faults"].add_column("event", str)
    db["faults"].add_column("event_sent", float)
    db.execute("UPDATE faults SET event_sent = ts")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a sample must survive a power cut
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class NodeStore:
    """Typed access to the node's tables; thread-safe (one lock, one writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_utils.Database(connect(path))
        self._lock = threading.Lock()
        with self._lock:
            migrations.apply(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.conn.close()

    # -- key/value (the last desired state, counters) --------------------
    def get_json(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else default

    def put_json(self, key: str, value: Any) -> None:
        with self._lock, self._db.conn:
            self._db.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, json.dumps(value)],
            )

    # -- installed packages ----------------------------------------------
    def record_installed(self, name: str, version: str, sha256: str, app_dir: Path) -> None:
        with self._lock, self._db.conn:
            self._db["installed"].upsert(
                {"name": name, "version": version, "sha256": sha256,
                 "app_dir": str(app_dir), "installed_at": time.time()},
                pk="sha256",
            )

    def installed(self, sha256: str) -> dict | None:
        with self._lock:
            rows = list(self._db["installed"].rows_where("sha256 = ?", [sha256]))
        return rows[0] if rows else None

    def forget_installed(self, sha256: str) -> None:
        with self._lock, self._db.conn:
            self._db.execute("DELETE FROM installed WHERE sha256 = ?", [sha256])

    def all_installed(self) -> list[dict]:
        with self._lock:
            return list(self._db["installed"].rows)

    # -- results & samples -------------------------------------------------
    def add_results(self, rows: list[dict]) -> None:
        if not rows:
            return
        with self._lock, self._db.conn:
            self._db["results"].insert_all(rows)

    def add_sample(self, row: dict) -> bool:
        """Insert a sample; False if its id exists already (idempotent)."""
        row = {"usefulness": 0.0, "nbytes": 0, "heldout": 0, "labelled_at": None,
               "labelled_by": None, "label_source": None, "shared": None, **row}
        # a label given with the sample travels in the sample's own message
        row["label_sent"] = row.get("label_sent") or (
            time.time() if row.get("label") is not None else None)
        with self._lock, self._db.conn:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO samples (sample_id, created_at, app, version, reason, "
                "input_type, input_path, prediction, scores, label, source, msg_id, "
                "usefulness, nbytes, heldout, labelled_at, labelled_by, label_source, shared, "
                "label_sent) "
                "VALUES (:sample_id, :created_at, :app, :version, :reason, :input_type, "
                ":input_path, :prediction, :scores, :label, :source, :msg_id, :usefulness, "
                ":nbytes, :heldout, :labelled_at, :labelled_by, :label_source, :shared, "
                ":label_sent)",
                row,
            )
            return cur.rowcount == 1

    def get_sample(self, sample_id: str) -> dict | None:
        with self._lock:
            rows = list(self._db["samples"].rows_where("sample_id = ?", [sample_id]))
        return rows[0] if rows else None

    def set_label(self, sample_id: str, label: str, by: str | None, source: str) -> None:
        """Set the label, not yet sent (``label_sent`` NULL, in the same commit)."""
        with self._lock, self._db.conn:
            self._db.execute("UPDATE samples SET label = ?, labelled_at = ?, labelled_by = ?, "
                             "label_source = ?, label_sent = NULL WHERE sample_id = ?",
                             [label, time.time(), by, source, sample_id])

    def mark_label_sent(self, sample_id: str) -> None:
        with self._lock, self._db.conn:
            self._db.execute("UPDATE samples SET label_sent = ? WHERE sample_id = ?",
                             [time.time(), sample_id])

    def unsent_labels(self, limit: int = 10000) -> list[dict]:
        """Labelled samples whose label was never handed to the outbox."""
        with self._lock:
            return list(self._db["samples"].rows_where(
                "label IS NOT NULL AND label_sent IS NULL", order_by="labelled_at",
                limit=limit))

    def set_shared(self, sample_id: str, shared: str) -> None:
        with self._lock, self._db.conn:
            self._db.execute("UPDATE samples SET shared = ? WHERE sample_id = ?",
                             [shared, sample_id])

    def sample_usage(self) -> tuple[int, int]:
        """(samples, bytes of their inputs) kept on this node."""
        with self._lock:
            r = next(self._db.query("SELECT count(*) AS n, coalesce(sum(nbytes), 0) AS b "
                                    "FROM samples"))
        return r["n"], r["b"]

    def oldest_unlabelled(self, limit: int = 50) -> list[dict]:
        with self._lock:
            return list(self._db["samples"].rows_where(
                "label IS NULL", order_by="created_at", limit=limit,
                select="sample_id, input_path, nbytes"))

    def delete_sample(self, sample_id: str) -> None:
        with self._lock, self._db.conn:
            self._db.execute("DELETE FROM samples WHERE sample_id = ?", [sample_id])

    def query_samples(self, app: str | None = None, state: str = "all",
                      order: str = "newest", heldout: bool | None = None,
                      limit: int = 100, offset: int = 0) -> list[dict]:
        """Samples filtered by app and state (``unlabelled``, ``labelled``, ``all``),
        ``order`` ``newest`` or ``usefulness`` (the labelling queue: most useful first)."""
        where, args = [], []
        if app:
            where.append("app = ?")
            args.append(app)
        if state == "unlabelled":
            where.append("label IS NULL")
        elif state == "labelled":
            where.append("label IS NOT NULL")
        if heldout is not None:
            where.append("heldout = ?")
            args.append(int(heldout))
        order_by = ("usefulness DESC, created_at" if order == "usefulness"
                    else "created_at DESC")
        with self._lock:
            return list(self._db["samples"].rows_where(
                " AND ".join(where) or None, args, order_by=order_by, limit=limit,
                offset=offset))

    def sample_counts(self) -> dict[str, dict[str, int]]:
        """{app: {"kept", "labelled", "unlabelled", "heldout", "shared_full", ...}}."""
        with self._lock:
            rows = list(self._db.query(
                "SELECT app, count(*) AS kept, count(label) AS labelled, "
                "count(*) - count(label) AS unlabelled, "
                "coalesce(sum(heldout), 0) AS heldout, "
                "coalesce(sum(shared = 'full'), 0) AS shared_full, "
                "coalesce(sum(shared = 'metadata'), 0) AS shared_metadata, "
                "coalesce(sum(shared = 'features'), 0) AS shared_features, "
                "coalesce(sum(shared = 'none'), 0) AS shared_none "
                "FROM samples GROUP BY app"))
        return {r.pop("app"): r for r in rows}

    def mark_queued(self, sample_id: str) -> None:
        with self._lock, self._db.conn:
            self._db.execute("UPDATE samples SET queued = ? WHERE sample_id = ?",
                             [time.time(), sample_id])

    def unqueued_samples(self, limit: int = 10000) -> list[dict]:
        with self._lock:
            return list(self._db["samples"].rows_where(
                "queued IS NULL", order_by="created_at", limit=limit))

    def samples(self, app: str | None = None, limit: int = 100) -> list[dict]:
        where, args = ("app = ?", [app]) if app else (None, [])
        with self._lock:
            return list(self._db["samples"].rows_where(
                where, args, order_by="created_at desc", limit=limit))

    def count(self, table: str) -> int:
        with self._lock:
            return self._db[table].count

    # -- fine-tune runs ------------------------------------------------------
    def add_run(self, row: dict) -> None:
        now = time.time()
        with self._lock, self._db.conn:
            self._db["finetune_runs"].insert({"created_at": now, "updated_at": now, **row})

    def update_run(self, run_id: str, **fields: Any) -> None:
        for k in ("metrics", "lineage"):
            if k in fields and not isinstance(fields[k], (str, type(None))):
                fields[k] = json.dumps(fields[k])
        with self._lock, self._db.conn:
            self._db["finetune_runs"].update(run_id, {**fields, "updated_at": time.time()})

    def get_run(self, run_id: str) -> dict | None:
        with self._lock:
            rows = list(self._db["finetune_runs"].rows_where("run_id = ?", [run_id]))
        return _run(rows[0]) if rows else None

    def runs(self, app: str | None = None, states: tuple[str, ...] | None = None,
             limit: int = 100) -> list[dict]:
        where, args = [], []
        if app:
            where.append("app = ?")
            args.append(app)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        with self._lock:
            rows = list(self._db["finetune_runs"].rows_where(
                " AND ".join(where) or None, args, order_by="created_at DESC", limit=limit))
        return [_run(r) for r in rows]

    def field_accuracy(self, days: int = 14) -> list[dict]:
        """How often the served model was right on the samples a technician labelled:
        ``{app, version, day, n, correct}`` per app, version and day (UTC, by when
        the sample was seen), the last ``days`` days."""
        since = time.time() - days * 86400
        with self._lock:
            return [dict(r) for r in self._db.query(
                "SELECT app, version, date(created_at, 'unixepoch') AS day, count(*) AS n, "
                "sum(json_extract(prediction, '$.label') = label) AS correct FROM samples "
                "WHERE label IS NOT NULL AND created_at >= ? "
                "GROUP BY app, version, day ORDER BY app, day, version", [since])]

    def labelled_samples(self, app: str) -> list[dict]:
        """Every labelled sample of ``app`` (training and held out), oldest first."""
        with self._lock:
            return list(self._db["samples"].rows_where(
                "app = ? AND label IS NOT NULL", [app], order_by="created_at"))

    # -- alarms (edge_node/alarms.py) -------------------------------------------
    def add_alarm(self, row: dict) -> None:
        with self._lock, self._db.conn:
            self._db["alarms"].insert({"updated_at": time.time(), "events_sent": 0, **row})

    def mark_alarm_events(self, alarm_id: str, n: int) -> None:
        """The events of the first ``n`` history entries are in the outbox."""
        with self._lock, self._db.conn:
            self._db.execute("UPDATE alarms SET events_sent = max(coalesce(events_sent, 0), ?) "
                             "WHERE alarm_id = ?", [n, alarm_id])

    def alarms_unsent(self, limit: int = 10000) -> list[dict]:
        """Alarms with history entries whose event never reached the outbox."""
        with self._lock:
            return list(self._db["alarms"].rows_where(
                "coalesce(events_sent, 0) < json_array_length(coalesce(history, '[]'))",
                order_by="raised_at", limit=limit))

    def get_alarm(self, alarm_id: str) -> dict | None:
        with self._lock:
            rows = list(self._db["alarms"].rows_where("alarm_id = ?", [alarm_id]))
        return rows[0] if rows else None

    def query_alarms(self, states: tuple[str, ...] | None = None,
                     limit: int = 100) -> list[dict]:
        """Newest first, optionally only in ``states``."""
        where = f"state IN ({','.join('?' * len(states))})" if states else None
        with self._lock:
            return list(self._db["alarms"].rows_where(
                where, list(states or ()), order_by="raised_at DESC", limit=limit))

    def alarm_counts(self) -> dict[str, int]:
        """{state: alarms in it}."""
        with self._lock:
            return {r["state"]: r["n"] for r in self._db.query(
                "SELECT state, count(*) AS n FROM alarms GROUP BY state")}

    def touch_alarm(self, alarm_id: str, last_seen: float, frames: int) -> None:
        """A still active alarm saw more matching frames (a handled one is left as is)."""
        with self._lock, self._db.conn:
            self._db.execute(
                "UPDATE alarms SET last_seen = ?, frames = ?, updated_at = ? "
                "WHERE alarm_id = ? AND state IN ('open', 'acknowledged')",
                [last_seen, frames, time.time(), alarm_id])

    def set_alarm_fields(self, alarm_id: str, **fields: Any) -> None:
        with self._lock, self._db.conn:
            self._db["alarms"].update(alarm_id, {**fields, "updated_at": time.time()})

    def transition_alarm(self, alarm_id: str, from_states: tuple[str, ...], to_state: str,
                         fields: dict, entry: dict) -> tuple[bool, dict | None]:
        """Move an alarm to ``to_state`` if it is in one of ``from_states`` (atomic), set
        ``fields`` and append ``entry`` to its history: (moved, the row now); (False,
        None) for an unknown id."""
        with self._lock, self._db.conn:
            rows = list(self._db["alarms"].rows_where("alarm_id = ?", [alarm_id]))
            if not rows:
                return False, None
            row = rows[0]
            if row["state"] not in from_states:
                return False, row
            history = json.loads(row["history"] or "[]") + [entry]
            self._db["alarms"].update(alarm_id, {**fields, "state": to_state,
                                                 "history": json.dumps(history),
                                                 "updated_at": time.time()})
            return True, next(self._db["alarms"].rows_where("alarm_id = ?", [alarm_id]))

    def prune_alarms(self, keep: int) -> list[str]:
        """Delete the oldest ended alarms beyond ``keep`` in all; their evidence paths."""
        with self._lock, self._db.conn:
            excess = self._db["alarms"].count - keep
            if excess <= 0:
                return []
            rows = list(self._db.query(
                "SELECT alarm_id, evidence_path FROM alarms "
                "WHERE state NOT IN ('open', 'acknowledged') ORDER BY raised_at LIMIT ?",
                [excess]))
            self._db.conn.executemany("DELETE FROM alarms WHERE alarm_id = ?",
                                      [[r["alarm_id"]] for r in rows])
        return [r["evidence_path"] for r in rows if r["evidence_path"]]


def _run(r: dict) -> dict:
    for k in ("metrics", "lineage"):
        r[k] = json.loads(r[k]) if r.get(k) else None
    return r
