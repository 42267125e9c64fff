"""Durable outbox: write to SQLite first, send QoS 1, mark done only on the cloud's ack.

Life of a row in table ``cloud_sync_outbox``::

    put() -- INSERT, committed --> pending (attempts = 0)
          -- published ---------> pending (attempts > 0: in flight)
          -- Ack ok=True -------> acked     (bounded history, see below)
          -- Ack ok=False ------> rejected  (kept with its reason, counted, logged, never resent)

- The sender thread sends pending rows in created order (``seq``), with at most
  ``max_in_flight`` sent-but-unacked rows at a time.
- An unacked row is resent after its own backoff: with
  ``d = min(max_retry, min_retry * 2 ** (attempts - 1))`` the delay is uniform in
  ``[d/2, d]`` ("equal jitter": never zero, never a fleet in lockstep).
- After every (re)connect, and on :meth:`Outbox.start`, every unacked row is due
  at once: the broker (clean session) and paho (memory only) may have lost it.
- Nothing is final without an :class:`~cloud_sync.schemas.Ack`; paho's PUBACK
  only means the broker had it. Delivery is at-least-once, so the cloud
  consumer dedupes by ``msg_id`` (exactly-once acceptance).

History: acked rows beyond the newest ``keep_acked`` (default 1,000) and rejected
rows beyond the newest ``keep_rejected`` (default 10,000) are deleted after each
batch of acks, counted as ``pruned_acked`` / ``pruned_rejected``. Unsent rows are
never deleted: at ``max_rows`` of them :meth:`Outbox.put` raises
:class:`~cloud_sync.errors.OutboxFull`.

Threads and SQLite: one connection per outbox, guarded by a lock; WAL,
``busy_timeout`` and ``BEGIN IMMEDIATE`` write transactions, so other writers of
the same file (the edge node's store) are safe. Acks are parsed on the MQTT
network thread and handed to the sender thread, the only one that updates rows.
Use one Outbox per database file (two would both send the same rows). Memory:
at most ``max_in_flight`` payloads sit in paho's queue at once; lower it when
payloads are large.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from . import schemas
from .connection import MqttConnection
from .errors import MessageRejected, OutboxFull

logger = logging.getLogger(__name__)

TABLE = "cloud_sync_outbox"
BUSY_TIMEOUT_S = 10.0

migrations = Migrations("cloud_sync.outbox")


@migrations()
def m001_create_outbox(db: Database) -> None:
    table = db.table(TABLE)
    table.create(
        {"seq": int, "msg_id": str, "kind": str, "topic": str, "payload": bytes, "qos": int,
         "created_at": float, "state": str, "attempts": int, "sent_at": float,
         "next_retry": float, "done_at": float, "reason": str},
        pk="seq",
        not_null={"msg_id", "kind", "topic", "payload", "qos", "created_at", "state", "attempts"},
        defaults={"state": "pending", "attempts": 0},
    )
    table.create_index(["msg_id"], unique=True)
    table.create_index(["state", "seq"])
    table.create_index(["state", "attempts", "seq"])


def open_db(db_path: str | Path) -> sqlite3.Connection:
    """Open ``db_path`` (WAL, busy_timeout, synchronous=FULL) and migrate it."""
    conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    db = Database(conn)
    db.enable_wal()
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("BEGIN IMMEDIATE")  # serialise with other processes migrating the file
    try:
        migrations.apply(db)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return conn


class Outbox:
    """Durable QoS 1 uplink for messages that must not be lost (feedback, events)."""

    def __init__(self, db_path: str | Path, conn: MqttConnection, ack_topic: str, *,
                 max_in_flight: int = 100, min_retry: float = 2.0, max_retry: float = 60.0,
                 max_rows: int = 100_000, seed: int | None = None,
                 keep_acked: int = 1000, keep_rejected: int = 10_000) -> None:
        self._db = open_db(db_path)
        self._mqtt = conn
        self.ack_topic = ack_topic
        self.max_in_flight = max_in_flight
        self.min_retry = min_retry
        self.max_retry = max_retry
        self.max_rows = max_rows
        self.keep_acked = keep_acked
        self.keep_rejected = keep_rejected
        self._rng = random.Random(seed)
        self._lock = threading.RLock()  # the sqlite connection and the counters
        self._stats: Counter[str] = Counter()
        self._acks: queue.SimpleQueue[list[schemas.AckItem]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._reconnected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hooked = False

    # -- public API ---------------------------------------------------------
    def put(self, topic: str, payload: bytes, msg_id: str, kind: str = "feedback",
            qos: int = 1) -> bool:
        """Store a message durably (committed on return); False if ``msg_id`` is
        already stored. Raises :class:`OutboxFull` at ``max_rows`` unsent rows."""
        with self._lock:
            with self._tx() as c:
                if c.execute(f"SELECT 1 FROM {TABLE} WHERE msg_id = ?", [msg_id]).fetchone():
                    self._stats["duplicate_put"] += 1
                    return False
                unsent = self._count_pending(c)
                if unsent >= self.max_rows:
                    self._stats["full"] += 1
                    logger.warning("outbox: full (%d unsent), refused %s %s", unsent, kind, msg_id)
                    raise OutboxFull(unsent, self.max_rows)
                c.execute(
                    f"INSERT INTO {TABLE} (msg_id, kind, topic, payload, qos, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [msg_id, kind, topic, bytes(payload), qos, time.time()],
                )
            self._stats["queued"] += 1
        self._wake.set()
        return True

    def start(self) -> None:
        """Subscribe to the ack topic and start the sender thread; everything
        unacked from an earlier run is due at once."""
        if not self._hooked:
            self._mqtt.on_connect(self._on_connect)
            self._mqtt.subscribe(self.ack_topic, self._on_ack, qos=1)
            self._hooked = True
        with self._lock, self._tx() as c:
            c.execute(f"UPDATE {TABLE} SET next_retry = 0 WHERE state = 'pending' AND attempts > 0")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender thread. Rows stay in the database for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """:meth:`stop` and close the database connection."""
        self.stop()
        with self._lock:
            self._db.close()

    def pending(self) -> int:
        """Rows not yet acked (nor rejected)."""
        with self._lock:
            return self._count_pending(self._db)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
        out["pending"] = self.pending()
        return out

    def status(self, msg_id: str) -> str | None:
        """``'pending'``, ``'acked'``, ``'rejected'``, or None (unknown or pruned)."""
        with self._lock:
            row = self._db.execute(f"SELECT state FROM {TABLE} WHERE msg_id = ?",
                                   [msg_id]).fetchone()
        return row[0] if row else None

    def retry_now(self) -> None:
        """Resend every sent-but-unacknowledged message now rather than at its retry
        time: retry times are wall-clock, so after the clock jumped back they would
        lie far ahead (the ``clock`` health check calls this)."""
        self._reconnected.set()
        self._wake.set()

    # -- MQTT network thread ------------------------------------------------
    def _on_connect(self) -> None:
        self._reconnected.set()
        self._wake.set()

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._stop.is_set():
            return  # stopped: the rows are resent (and acked again) after the next start
        try:
            ack = schemas.parse(schemas.Ack, payload)
        except MessageRejected as err:
            with self._lock:
                self._stats["ack_malformed"] += 1
                self._stats[f"ack_malformed_{err.reason}"] += 1
            logger.warning("outbox: malformed ack on %s dropped: %s", topic, err)
            return
        self._acks.put(ack.acks)
        self._wake.set()

    # -- sender thread -------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._apply_acks()
                if self._reconnected.is_set():
                    self._reconnected.clear()
                    self._resend_all()
                if self._mqtt.connected.is_set():
                    self._send_due()
                wait = self._next_wait()
            except sqlite3.Error:
                with self._lock:
                    self._stats["db_error"] += 1
                logger.exception("outbox: database error, retrying in 1s")
                wait = 1.0
            self._wake.wait(wait)

    def _apply_acks(self) -> None:
        items: list[schemas.AckItem] = []
        while True:
            try:
                items.extend(self._acks.get_nowait())
            except queue.Empty:
                break
        if not items:
            return
        counts: Counter[str] = Counter()
        now = time.time()
        with self._lock:
            with self._tx() as c:
                for item in items:
                    row = c.execute(f"SELECT state FROM {TABLE} WHERE msg_id = ?",
                                    [item.msg_id]).fetchone()
                    if row is None:
                        counts["ack_unknown"] += 1
                    elif row[0] != "pending":
                        counts["ack_duplicate"] += 1
                    elif item.ok:
                        c.execute(f"UPDATE {TABLE} SET state = 'acked', done_at = ?"
                                  " WHERE msg_id = ?", [now, item.msg_id])
                        counts["acked"] += 1
                    else:
                        c.execute(f"UPDATE {TABLE} SET state = 'rejected', done_at = ?, reason = ?"
                                  " WHERE msg_id = ?", [now, item.reason, item.msg_id])
                        counts["rejected"] += 1
                        logger.warning("outbox: cloud rejected %s: %s", item.msg_id, item.reason)
                counts["pruned_acked"] = self._prune(c, "acked", self.keep_acked)
                counts["pruned_rejected"] = self._prune(c, "rejected", self.keep_rejected)
            self._stats.update(+counts)  # unary + drops zero counts
        if counts["ack_unknown"]:
            logger.info("outbox: %d acks for unknown msg ids", counts["ack_unknown"])

    def _resend_all(self) -> None:
        with self._lock, self._tx() as c:
            n = c.execute(f"UPDATE {TABLE} SET next_retry = 0"
                          " WHERE state = 'pending' AND attempts > 0").rowcount
        if n:
            logger.info("outbox: (re)connected, resending %d unacked messages", n)

    def _send_due(self) -> None:
        now = time.time()
        cols = "seq, topic, qos, attempts"  # payloads are read one at a time, below
        with self._lock:
            c = self._db
            in_flight = c.execute(f"SELECT COUNT(*) FROM {TABLE}"
                                  " WHERE state = 'pending' AND attempts > 0").fetchone()[0]
            due = c.execute(f"SELECT {cols} FROM {TABLE} WHERE state = 'pending' AND attempts > 0"
                            " AND next_retry <= ? ORDER BY seq LIMIT ?",
                            [now, self.max_in_flight]).fetchall()
            room = max(0, self.max_in_flight - in_flight)
            fresh = c.execute(f"SELECT {cols} FROM {TABLE} WHERE state = 'pending' AND attempts = 0"
                              " ORDER BY seq LIMIT ?", [room]).fetchall()
        sent = []
        for seq, topic, qos, attempts in sorted(due + fresh):
            with self._lock:
                payload = self._db.execute(f"SELECT payload FROM {TABLE} WHERE seq = ?",
                                           [seq]).fetchone()[0]
            if not self._mqtt.publish(topic, payload, qos=qos):
                with self._lock:
                    self._stats["publish_failed"] += 1
                break  # offline or paho's queue full: try again on the next round
            sent.append((seq, attempts))
        if not sent:
            return
        with self._lock:
            with self._tx() as c:
                for seq, attempts in sent:
                    c.execute(f"UPDATE {TABLE} SET attempts = ?, sent_at = ?, next_retry = ?"
                              " WHERE seq = ? AND state = 'pending'",
                              [attempts + 1, now, now + self._delay(attempts + 1), seq])
            resent = sum(1 for _s, a in sent if a)
            self._stats["sent"] += len(sent) - resent
            self._stats["resent"] += resent

    def _next_wait(self) -> float:
        if not self._mqtt.connected.is_set():
            return 1.0  # the on-connect hook wakes us
        with self._lock:
            nxt = self._db.execute(f"SELECT MIN(next_retry) FROM {TABLE}"
                                   " WHERE state = 'pending' AND attempts > 0").fetchone()[0]
        if nxt is None:
            return 1.0
        return min(1.0, max(0.01, nxt - time.time()))

    # -- helpers --------------------------------------------------------------
    def _delay(self, attempt: int) -> float:
        d = min(self.max_retry, self.min_retry * 2 ** min(attempt - 1, 30))
        return d / 2 + self._rng.uniform(0, d / 2)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self._db
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    @staticmethod
    def _count_pending(c: sqlite3.Connection) -> int:
        return c.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE state = 'pending'").fetchone()[0]

    @staticmethod
    def _prune(c: sqlite3.Connection, state: str, keep: int) -> int:
        row = c.execute(f"SELECT seq FROM {TABLE} WHERE state = ? ORDER BY seq DESC"
                        " LIMIT 1 OFFSET ?", [state, keep]).fetchone()
        if row is None:
            return 0
        return c.execute(f"DELETE FROM {TABLE} WHERE state = ? AND seq <= ?",
                         [state, row[0]]).rowcount
