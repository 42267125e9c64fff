"""The AppStore's SQLite database: schema (migrations), WAL, writer and readers.

The store owns its schema through :class:`sqlite_utils.migrations.Migrations`.
One writer connection, serialized by a lock, takes every write (the ingest
thread and the REST handlers share it); every read opens a connection of its
own, which WAL lets run beside the writer.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

logger = logging.getLogger(__name__)

migrations = Migrations("appstore")
BUSY_TIMEOUT_MS = 10000


@migrations()
def m001_initial(db: Database) -> None:
    db["app_versions"].create(
        {
            "id": int, "name": str, "version": str, "sha256": str, "size": int,
            "task": str, "manifest": str, "key_id": str, "published_at": float,
        },
        pk="id",
        not_null={"name", "version", "sha256", "size", "manifest", "published_at"},
    )
    db["app_versions"].create_index(["name", "version"], unique=True)
    db["app_versions"].create_index(["sha256"])
    db["nodes"].create(
        {
            "node_id": str, "online": int, "last_seen": float, "agent_version": str,
            "reported": str, "reported_at": float, "http_url": str,
            "desired_revision": int, "first_seen": float,
        },
        pk="node_id",
        defaults={"online": 0, "desired_revision": 0},
    )
    db["assignments"].create(
        {"node_id": str, "app": str, "version": str, "assigned_at": float},
        pk=("node_id", "app"),
    )
    db["feedback"].create(
        {
            "id": int, "msg_id": str, "node_id": str, "app": str, "version": str,
            "sample_id": str, "created_at": float, "received_at": float,
            "reason": str, "input_type": str, "input_sha256": str, "input_path": str,
            "prediction": str, "scores": str, "label": str, "source": str,
        },
        pk="id",
        not_null={"msg_id", "node_id", "app", "received_at"},
    )
    db["feedback"].create_index(["msg_id"], unique=True)
    db["feedback"].create_index(["app", "version"])
    db["feedback"].create_index(["node_id"])
    db["events"].create(
        {
            "id": int, "msg_id": str, "node_id": str, "ts": float, "received_at": float,
            "type": str, "severity": str, "app": str, "data": str,
        },
        pk="id",
        not_null={"msg_id", "node_id", "type"},
    )
    db["events"].create_index(["msg_id"], unique=True)
    db["rejections"].create(
        {"reason": str, "count": int, "last_at": float, "last_detail": str},
        pk="reason",
    )


@migrations()
def m003_assignment_resources(db: Database) -> None:
    """An operator's per-node resource override (JSON), or NULL."""
    db["assignments"].add_column("resources", str)


@migrations()
def m002_epoch(db: Database) -> None:
    """A random id of this database. Desired states carry it, so a node accepts
    a lower revision from a rebuilt or restored store instead of ignoring it."""
    import uuid

    db["store_meta"].create({"key": str, "value": str}, pk="key")
    db["store_meta"].insert({"key": "epoch", "value": uuid.uuid4().hex})


@migrations()
def m004_node_training(db: Database) -> None:
    """The operator's training windows for a node (a TrainingSchedule as JSON), or
    NULL: the node's own config applies."""
    db["nodes"].add_column("training", str)


@migrations()
def m005_feedback_sharing(db: Database) -> None:
    """What each sample's site let travel, its usefulness and held-out flag, and
    labels set on site after the sample was sent (the ``sample_labelled`` event)."""
    for col, typ in (("shared", str), ("usefulness", float), ("heldout", int),
                     ("labelled_at", float), ("labelled_by", str)):
        db["feedback"].add_column(col, typ)
    db.execute("UPDATE feedback SET shared = 'full', usefulness = 0, heldout = 0")
    db["feedback"].create_index(["node_id", "sample_id"])
    db["assignments"].add_column("upload", str)  # full | metadata | none | NULL
    db["site_labels"].create({"node_id": str, "sample_id": str, "label": str,
                              "labelled_at": float, "labelled_by": str},
                             pk=("node_id", "sample_id"))


@migrations()
def m006_retrains(db: Database) -> None:
    """Retraining from the fleet's labelled samples (appstore/retrain.py)."""
    db["retrains"].create(
        {"retrain_id": str, "app": str, "base_version": str, "version": str, "state": str,
         "reason": str, "requested_by": str, "created_at": float, "updated_at": float,
         "assign": str, "metrics": str, "lineage": str, "sha256": str},
        pk="retrain_id", not_null={"app", "base_version", "version", "state"})
    db["feedback"].create_index(["app", "input_sha256"])


@migrations()
def m007_telemetry(db: Database) -> None:
    """Learning telemetry from the nodes: the latest per node and app, and a point
    each time an app's figures changed (accuracy over time, kept small)."""
    db["telemetry_latest"].create(
        {"node_id": str, "app": str, "ts": float, "received_at": float, "data": str},
        pk=("node_id", "app"))
    db["telemetry_points"].create(
        {"id": int, "node_id": str, "app": str, "ts": float, "version": str, "variant": str,
         "labelled": int, "correct": int, "accuracy": float, "samples_kept": int,
         "samples_labelled": int}, pk="id")
    db["telemetry_points"].create_index(["app", "ts"])


@migrations()
def m008_feedback_features(db: Database) -> None:
    """Upload level ``features``: a sample's feature vector (content-addressed in the
    samples store, ``<sha256>.f32``: little-endian float32) and the model that made it."""
    for col, typ in (("features_sha256", str), ("feature_tensor", str), ("n_features", int),
                     ("head_node", str), ("model_version", str), ("model_sha256", str)):
        db["feedback"].add_column(col, typ)
    db["feedback"].create_index(["app", "features_sha256"])


@migrations()
def m009_enrolment(db: Database) -> None:
    """Enrolment (appstore/enrolment.py): one-time tokens, kept as their sha256
    only, and each enrolled node's broker credentials, kept as Mosquitto's
    PBKDF2 hash only."""
    db["enrolment_tokens"].create(
        {"token_id": str, "token_sha256": str, "created_at": float, "expires_at": float,
         "created_by": str, "note": str, "used_at": float, "used_by": str},
        pk="token_id", not_null={"token_sha256", "created_at", "expires_at"})
    db["enrolment_tokens"].create_index(["token_sha256"], unique=True)
    db["node_credentials"].create(
        {"node_id": str, "username": str, "password_hash": str, "site": str, "grp": str,
         "token_id": str, "enrolled_at": float, "revoked_at": float, "revoked_by": str},
        pk="node_id", not_null={"username", "password_hash", "enrolled_at"})


@migrations()
def m010_rollouts(db: Database) -> None:
    """Fleet rollouts (appstore/rollouts.py): where each node sits (site, group,
    tags) for targeting, each node's app health per version from its telemetry,
    and the rollouts with their per-node state and log."""
    db["nodes"].add_column("site", str)
    db["nodes"].add_column("grp", str)
    db["nodes"].add_column("tags", str)
    db["app_health"].create(
        {"node_id": str, "app": str, "version": str, "since": float, "updated_at": float,
         "requests": int, "errors": int, "p95_max_ms": float, "reports": int},
        pk=("node_id", "app"))
    db["rollouts"].create(
        {"rollout_id": str, "app": str, "version": str, "target": str, "plan": str,
         "gate": str, "state": str, "wave": int, "wave_started_at": float,
         "ready_at": float, "reason": str, "created_at": float, "created_by": str,
         "updated_at": float, "finished_at": float, "deadline": float},
        pk="rollout_id", not_null={"app", "version", "state", "created_at"})
    db["rollouts"].create_index(["state"])
    db["rollout_nodes"].create(
        {"rollout_id": str, "node_id": str, "wave": int, "prev_version": str,
         "state": str, "reason": str, "updated_at": float},
        pk=("rollout_id", "node_id"))
    db["rollout_nodes"].create_index(["rollout_id", "wave"])
    db["rollout_log"].create(
        {"id": int, "rollout_id": str, "ts": float, "what": str, "detail": str}, pk="id")
    db["rollout_log"].create_index(["rollout_id", "ts"])


@migrations()
def m011_commands(db: Database) -> None:
    """Remote operations (appstore/commands.py): commands to nodes with their state
    and result (a diagnostics bundle by its sha256 in the bundles store), and the
    audit log of who asked what, when, for which node, and the outcome."""
    db["commands"].create(
        {"command_id": str, "node_id": str, "op": str, "args": str, "created_by": str,
         "created_at": float, "expires_at": float, "state": str, "sent_at": float,
         "sends": int, "started_at": float, "finished_at": float, "result": str,
         "error": str, "bundle_sha256": str, "duplicates": int, "updated_at": float},
        pk="command_id", not_null={"node_id", "op", "state", "created_at", "expires_at"})
    db["commands"].create_index(["state", "expires_at"])
    db["commands"].create_index(["node_id", "created_at"])
    db["audit_log"].create(
        {"id": int, "ts": float, "actor": str, "action": str, "node_id": str,
         "command_id": str, "op": str, "args": str, "outcome": str, "detail": str},
        pk="id", not_null={"ts", "action"})
    db["audit_log"].create_index(["node_id", "ts"])


@migrations()
def m012_subscriptions(db: Database) -> None:
    """Channels (an app's named pointer to a version) and subscriptions (a channel
    given to a target), appstore/subscriptions.py; a rollout may move a channel."""
    db["channels"].create(
        {"app": str, "channel": str, "version": str, "updated_at": float, "updated_by": str},
        pk=("app", "channel"))
    db["subscriptions"].create(
        {"id": int, "app": str, "channel": str, "target": str, "created_at": float,
         "created_by": str}, pk="id")
    db["rollouts"].add_column("channel", str)


@migrations()
def m013_operators(db: Database) -> None:
    """Operator accounts of the REST API (appstore/auth.py): name, role and the
    sha256 of the API token (never the token), when it was made, last used,
    expires and was revoked. A name is unique among the unrevoked."""
    db["operators"].create(
        {"id": int, "name": str, "role": str, "token_sha256": str, "created_at": float,
         "created_by": str, "last_used_at": float, "expires_at": float,
         "revoked_at": float, "revoked_by": str},
        pk="id", not_null={"name", "role", "token_sha256", "created_at"})
    db["operators"].create_index(["token_sha256"], unique=True)
    db["operators"].create_index(["name"])


def _connect(path: Path) -> Database:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    db = Database(conn, execute_plugins=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


def _enable_wal(db: Database) -> None:
    """WAL mode; switching a fresh file that another worker is creating fails at
    once with "locked" (no busy handler there), so retry up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Store:
    """The database file, migrated and in WAL mode."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = _connect(self.path)
        _enable_wal(self._db)
        # FULL: a commit survives power loss, and we ack only after commit
        self._db.execute("PRAGMA synchronous = FULL")
        with self._lock:
            # one transaction, the write lock taken first: AppStore workers started
            # together on a fresh file wait for each other (a deferred transaction
            # would fail at once with "database is locked", or both would migrate)
            self._db.conn.execute("BEGIN IMMEDIATE")
            try:
                pending = [m.name for m in migrations.pending(self._db)]
                migrations.apply(self._db)
                self._db.conn.execute("COMMIT")
            except BaseException:
                self._db.rollback()
                raise
        if pending:
            logger.info("database %s: applied migrations %s", self.path, pending)

    @contextlib.contextmanager
    def write(self) -> Iterator[Database]:
        """The writer, inside one transaction (committed on success).

        ``BEGIN IMMEDIATE`` takes the write lock up front, waiting up to the busy
        timeout for another process (a second worker, ``store publish``); a
        deferred BEGIN that reads first could fail at once with "locked" when
        it later needs to write. Nested ``db.atomic()`` blocks are savepoints.
        """
        with self._lock:
            self._db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.conn.execute("COMMIT")
            except BaseException:
                self._db.rollback()
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Database]:
        """A reader connection of its own (WAL: never blocks on the writer)."""
        db = _connect(self.path)
        try:
            yield db
        finally:
            db.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
