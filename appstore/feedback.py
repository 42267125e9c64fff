"""Feedback samples and events from the fleet, and counted rejections.

Ingest is idempotent by ``msg_id``: a node resends until it sees an ack, so the
same message may arrive many times and is stored once. A sample's input (a PNG
or an ``.npy`` tensor) is kept content-addressed in ``data_dir/samples``; so is
a features-only sample's feature vector (``<sha256>.f32``, little-endian
float32), checked first: a wrong length or a non-finite value is refused
(``bad_features``, counted with the reason).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from cloud_sync.errors import MessageRejected
from cloud_sync.schemas import EventMessage, FeedbackMessage

from .blobstore import ContentStore
from .db import Store
from .errors import NotFound

logger = logging.getLogger(__name__)

#: input_type -> (file extension, HTTP content type)
INPUT_TYPES = {
    "image/png": ("png", "image/png"),
    "image/jpeg": ("jpg", "image/jpeg"),
    "tensor/npy": ("npy", "application/x-npy"),
}
#: file extension of a stored feature vector (raw little-endian float32)
FEATURES_EXT = "f32"
MAX_LIMIT = 1000


def _exists(db: Database, table: str, msg_id: str) -> bool:
    return bool(list(db.query(f"select 1 from {table} where msg_id = ?", [msg_id])))


class FeedbackStore:
    def __init__(self, store: Store, samples: ContentStore) -> None:
        self.store = store
        self.samples = samples

    # -- ingest (the ingest thread, inside its transaction) -----------------------
    def record_feedback(self, db: Database, node_id: str, msg: FeedbackMessage,
                        received_at: float) -> bool:
        """Store ``msg`` unless its msg_id is known; True when it was new.

        Raises :class:`MessageRejected` (``bad_input``) for an input that is
        not base64."""
        if _exists(db, "feedback", msg.msg_id):
            return False
        s = msg.sample
        sha = path = None
        if s.input_type != "none":  # metadata only: the site kept the input home
            try:
                data = base64.b64decode(s.input_b64, validate=True)
            except (binascii.Error, ValueError) as err:
                raise MessageRejected("bad_input", f"input_b64 is not base64: {err}") from err
            if not data:
                raise MessageRejected("bad_input", "empty input")
            sha, path = self.samples.put_bytes(data, INPUT_TYPES[s.input_type][0])
        feat: dict[str, Any] = {}
        if s.features is not None:  # the site shares the head's features, not the input
            f = s.features
            try:
                raw = f.values()
            except ValueError as err:
                raise MessageRejected("bad_features", f"sample {s.sample_id} of {s.app} "
                                      f"{s.version}: {err}") from err
            fsha, _ = self.samples.put_bytes(raw, FEATURES_EXT)
            feat = {"features_sha256": fsha, "feature_tensor": f.tensor, "n_features": f.n,
                    "head_node": f.head, "model_version": f.model_version,
                    "model_sha256": f.model_sha256}
        # a label set on site may have arrived (as an event) before the sample
        early = list(db.query("select label, labelled_at, labelled_by from site_labels "
                              "where node_id = ? and sample_id = ?", [node_id, s.sample_id]))
        label = early[0] if early else {"label": s.label, "labelled_at": None,
                                        "labelled_by": None}
        db["feedback"].insert({
            "msg_id": msg.msg_id, "node_id": node_id, "app": s.app, "version": s.version,
            "sample_id": s.sample_id, "created_at": s.created_at, "received_at": received_at,
            "reason": s.reason, "input_type": s.input_type, "input_sha256": sha,
            "input_path": str(path) if path else None,
            "prediction": s.prediction.model_dump_json(),
            "scores": json.dumps(s.scores), "label": label["label"], "source": s.source,
            "shared": s.shared, "usefulness": s.usefulness, "heldout": int(s.heldout),
            "labelled_at": label["labelled_at"], "labelled_by": label["labelled_by"],
            **feat,
        })
        return True

    @staticmethod
    def record_site_label(db: Database, node_id: str, data: dict[str, Any]) -> None:
        """A ``sample_labelled`` event: the label a technician gave on site. Kept
        apart too, so a label that overtakes its sample is applied on arrival."""
        sid, label = data.get("sample_id"), data.get("label")
        if not isinstance(sid, str) or not isinstance(label, str):
            raise MessageRejected("bad_label_event", "sample_labelled needs sample_id and label")
        at, by = data.get("labelled_at"), data.get("by")
        db.execute("insert into site_labels (node_id, sample_id, label, labelled_at, labelled_by)"
                   " values (?, ?, ?, ?, ?) on conflict(node_id, sample_id) do update set "
                   "label = excluded.label, labelled_at = excluded.labelled_at, "
                   "labelled_by = excluded.labelled_by "
                   "where excluded.labelled_at >= coalesce(site_labels.labelled_at, 0)",
                   [node_id, sid, label, at, by])
        db.execute("update feedback set label = ?, labelled_at = ?, labelled_by = ? "
                   "where node_id = ? and sample_id = ? and "
                   "coalesce(labelled_at, 0) <= coalesce(?, 0)",
                   [label, at, by, node_id, sid, at])

    @staticmethod
    def record_event(db: Database, node_id: str, msg: EventMessage, received_at: float) -> bool:
        if _exists(db, "events", msg.msg_id):
            return False
        db["events"].insert({
            "msg_id": msg.msg_id, "node_id": node_id, "ts": msg.ts, "received_at": received_at,
            "type": msg.type, "severity": msg.severity, "app": msg.app,
            "data": json.dumps(msg.data),
        })
        if msg.type == "sample_labelled":
            FeedbackStore.record_site_label(db, node_id, msg.data)
        return True

    @staticmethod
    def record_telemetry(db: Database, node_id: str, msg: Any, received_at: float) -> int:
        """The latest figures per app; a point when they changed. Points added."""
        added = 0
        for app, t in msg.apps.items():
            prev = list(db.query("select data from telemetry_latest where node_id = ? and "
                                 "app = ?", [node_id, app]))
            data = t.model_dump()
            db.execute("insert into telemetry_latest (node_id, app, ts, received_at, data) "
                       "values (?, ?, ?, ?, ?) on conflict(node_id, app) do update set "
                       "ts = excluded.ts, received_at = excluded.received_at, "
                       "data = excluded.data", [node_id, app, msg.ts, received_at,
                                                json.dumps(data)])
            FeedbackStore._health(db, node_id, app, t, msg.ts)
            key = ("version", "variant", "labelled", "correct", "samples_kept",
                   "samples_labelled")
            old = json.loads(prev[0]["data"]) if prev else None
            if old is None or any(old.get(k) != data[k] for k in key):
                db["telemetry_points"].insert({
                    "node_id": node_id, "app": app, "ts": msg.ts,
                    **{k: data[k] for k in key}, "accuracy": data["accuracy"]})
                added += 1
        return added

    @staticmethod
    def _health(db: Database, node_id: str, app: str, t: Any, ts: float) -> None:
        """Accumulate the app's serving figures per version (rollout health gates):
        a new version on the node starts from zero."""
        db.execute(
            "insert into app_health (node_id, app, version, since, updated_at, requests, "
            "errors, p95_max_ms, reports) values (:n, :a, :v, :ts, :ts, :r, :e, :p, 1) "
            "on conflict(node_id, app) do update set "
            "since = iif(version = excluded.version, since, excluded.since), "
            "requests = iif(version = excluded.version, requests, 0) + excluded.requests, "
            "errors = iif(version = excluded.version, errors, 0) + excluded.errors, "
            "p95_max_ms = iif(version = excluded.version, "
            "  max(coalesce(p95_max_ms, 0), coalesce(excluded.p95_max_ms, 0)), "
            "  excluded.p95_max_ms), "
            "reports = iif(version = excluded.version, reports, 0) + 1, "
            "updated_at = excluded.updated_at, version = excluded.version",
            {"n": node_id, "a": app, "v": t.version, "ts": ts, "r": t.requests,
             "e": t.errors, "p": t.latency_p95_ms})

    def telemetry(self, app: str | None = None, node: str | None = None) -> list[dict]:
        where, args = [], []
        for col, val in (("app", app), ("node_id", node)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "select * from telemetry_latest" + (" where " + " and ".join(where)
                                                  if where else "") + " order by node_id, app"
        with self.store.read() as db:
            return [{**{k: r[k] for k in ("node_id", "app", "ts", "received_at")},
                     **json.loads(r["data"])} for r in db.query(sql, args)]

    def accuracy_series(self, app: str, node: str | None = None,
                        limit: int = 1000) -> list[dict]:
        sql = "select * from telemetry_points where app = ?"
        args: list[Any] = [app]
        if node:
            sql += " and node_id = ?"
            args.append(node)
        sql += " order by ts limit ?"
        args.append(max(1, min(int(limit), MAX_LIMIT)))
        with self.store.read() as db:
            return [{k: v for k, v in r.items() if k != "id"} for r in db.query(sql, args)]

    @staticmethod
    def record_rejection(db: Database, reason: str, detail: str, at: float) -> None:
        db.execute(
            "insert into rejections (reason, count, last_at, last_detail) values (?, 1, ?, ?) "
            "on conflict(reason) do update set count = count + 1, last_at = excluded.last_at, "
            "last_detail = excluded.last_detail",
            [reason, at, detail[:500]],
        )

    # -- queries ---------------------------------------------------------------
    def query(self, app: str | None = None, node: str | None = None,
              version: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first, filtered by any of app / node / version."""
        where, args = [], []
        for col, val in (("app", app), ("node_id", node), ("version", version)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "select * from feedback"
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by received_at desc, id desc limit ?"
        args.append(max(1, min(int(limit), MAX_LIMIT)))
        with self.store.read() as db:
            return [self._row(r) for r in db.query(sql, args)]

    def events(self, node: str | None = None, app: str | None = None,
               type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events from the fleet, newest first, filtered by node / app / type."""
        where, args = [], []
        for col, val in (("node_id", node), ("app", app), ("type", type)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "select * from events"
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by received_at desc, rowid desc limit ?"
        args.append(max(1, min(int(limit), MAX_LIMIT)))
        with self.store.read() as db:
            rows = list(db.query(sql, args))
        for r in rows:
            r.pop("id", None)
            r["data"] = json.loads(r["data"]) if r.get("data") else {}
        return rows

    def get(self, msg_id: str) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from feedback where msg_id = ?", [msg_id]))
        if not rows:
            raise NotFound("unknown_sample", f"no feedback message {msg_id!r}")
        return self._row(rows[0])

    def input_file(self, msg_id: str) -> tuple[Path, str]:
        """The stored input of a sample and its HTTP content type."""
        row = self.get(msg_id)
        if row["input_type"] == "none":
            raise NotFound("input_not_shared", f"the site of {msg_id!r} does not share inputs "
                           f"(upload policy: {row.get('shared')})")
        ext, ctype = INPUT_TYPES[row["input_type"]]
        path = self.samples.path(row["input_sha256"], ext)
        if path is None:
            raise NotFound("input_missing", f"the input of {msg_id!r} is not on disk")
        return path, ctype

    def features(self, msg_id: str) -> dict[str, Any]:
        """A features-only sample's vector and the model that made it."""
        import numpy as np

        row = self.get(msg_id)
        if not row.get("features_sha256"):
            raise NotFound("features_not_shared", f"{msg_id!r} was shared as "
                           f"{row.get('shared')!r}, without features")
        path = self.samples.path(row["features_sha256"], FEATURES_EXT)
        if path is None:
            raise NotFound("features_missing", f"the features of {msg_id!r} are not on disk")
        return {"msg_id": msg_id, "tensor": row["feature_tensor"], "n": row["n_features"],
                "head": row["head_node"], "model_version": row["model_version"],
                "model_sha256": row["model_sha256"], "dtype": "float32",
                "values": np.fromfile(path, "<f4").tolist()}

    @staticmethod
    def _row(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in r.items() if k not in ("id", "input_path")}
        out["prediction"] = json.loads(r["prediction"]) if r["prediction"] else None
        out["scores"] = json.loads(r["scores"]) if r["scores"] else []
        return out

    def rejections(self) -> dict[str, dict[str, Any]]:
        with self.store.read() as db:
            return {r["reason"]: {"count": r["count"], "last_at": r["last_at"],
                                  "last_detail": r["last_detail"]}
                    for r in db.query("select * from rejections order by reason")}

    def counts(self) -> dict[str, int]:
        with self.store.read() as db:
            f = next(db.query("select count(*) as n from feedback"))["n"]
            e = next(db.query("select count(*) as n from events"))["n"]
        return {"feedback": f, "events": e}
