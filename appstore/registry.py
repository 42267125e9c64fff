"""The fleet registry: nodes (what they report) and assignments (what we want).

Node rows are upserted from the retained ``availability`` and
``state/reported`` messages; assignments are changed by operators and each
change bumps the node's ``desired_revision``, the monotonic revision of the
:class:`~cloud_sync.schemas.DesiredState` the node receives.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlite_utils import Database

from cloud_sync.schemas import (AppRef, Availability, DesiredState, ReportedState,
                                TrainingSchedule)
from cloud_sync.topics import validate_node_id

from .db import Store
from .errors import BadRequest, NotFound

logger = logging.getLogger(__name__)

_UPSERT = """
insert into nodes (node_id, online, last_seen, first_seen, agent_version, desired_revision)
values (:node_id, coalesce(:online, 0), nullif(:seen, 0), nullif(:seen, 0), :agent_version, 0)
on conflict(node_id) do update set
  online = coalesce(:online, online),
  last_seen = nullif(max(coalesce(last_seen, 0), :seen), 0),
  first_seen = coalesce(first_seen, nullif(:seen, 0)),
  agent_version = coalesce(nullif(:agent_version, ''), agent_version)
"""


def check_node_id(node_id: str) -> str:
    try:
        return validate_node_id(node_id)
    except ValueError as err:
        raise BadRequest("bad_node_id", str(err)) from err


def _seen(ts: float, retained: bool, received_at: float) -> float:
    """A retained message may be old: trust its own time (never in the future)."""
    return min(ts, received_at) if retained else received_at


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- from MQTT (the ingest thread, inside its transaction) --------------------
    @staticmethod
    def record_availability(db: Database, node_id: str, msg: Availability, retained: bool,
                            received_at: float) -> None:
        db.execute(_UPSERT, {
            "node_id": node_id, "online": int(msg.status == "online"),
            "seen": _seen(msg.ts, retained, received_at), "agent_version": msg.agent_version,
        })

    @staticmethod
    def record_reported(db: Database, node_id: str, msg: ReportedState, retained: bool,
                        received_at: float) -> None:
        db.execute(_UPSERT, {
            "node_id": node_id, "online": None,
            "seen": _seen(msg.ts, retained, received_at), "agent_version": msg.agent_version,
        })
        db.execute(
            "update nodes set reported = ?, reported_at = ?, http_url = ? where node_id = ?",
            [msg.model_dump_json(), msg.ts, msg.http_url, node_id],
        )

    # -- operators -------------------------------------------------------------
    def assign(self, node_id: str, app: str, version: str,
               resources: dict[str, Any] | None = None, upload: str | None = None) -> int:
        """Want ``app`` at ``version`` on the node, with an optional resource
        override; returns the desired revision (bumped only when something
        changed). The caller checked the version exists."""
        check_node_id(node_id)
        now = time.time()
        with self.store.write() as db:
            db.execute(_UPSERT, {"node_id": node_id, "online": None, "seen": 0,
                                 "agent_version": ""})
            res = json.dumps(resources, sort_keys=True) if resources else None
            cur = list(db.query("select version, resources, upload from assignments "
                                "where node_id = ? and app = ?", [node_id, app]))
            if not cur or (cur[0]["version"], cur[0]["resources"], cur[0]["upload"]) != \
                    (version, res, upload):
                db["assignments"].upsert(
                    {"node_id": node_id, "app": app, "version": version, "assigned_at": now,
                     "resources": res, "upload": upload},
                    pk=("node_id", "app"))
                db.execute("update nodes set desired_revision = desired_revision + 1 "
                           "where node_id = ?", [node_id])
            rev = next(db.query("select desired_revision from nodes where node_id = ?",
                                [node_id]))["desired_revision"]
        logger.info("node %s: want %s %s (revision %d)", node_id, app, version, rev)
        return rev

    def set_versions(self, node_ids: list[str], app: str, version: str) -> list[str]:
        """Want ``app`` at ``version`` on every node, keeping each node's resource
        override and upload level, in one transaction; the nodes whose desired
        state changed. The caller checked the version exists."""
        now = time.time()
        changed = []
        with self.store.write() as db:
            cur = {r["node_id"]: r for r in db.query(
                "select node_id, version, resources, upload from assignments where app = ?",
                [app])}
            for node_id in node_ids:
                check_node_id(node_id)
                c = cur.get(node_id)
                if c is not None and c["version"] == version:
                    continue
                db.execute(_UPSERT, {"node_id": node_id, "online": None, "seen": 0,
                                     "agent_version": ""})
                db["assignments"].upsert(
                    {"node_id": node_id, "app": app, "version": version, "assigned_at": now,
                     "resources": c["resources"] if c else None,
                     "upload": c["upload"] if c else None}, pk=("node_id", "app"))
                db.execute("update nodes set desired_revision = desired_revision + 1 "
                           "where node_id = ?", [node_id])
                changed.append(node_id)
        if changed:
            logger.info("%d node(s): want %s %s", len(changed), app, version)
        return changed

    def set_training(self, node_id: str, training: TrainingSchedule | None) -> int:
        """Set (or with None, clear) the node's training windows; returns the
        desired revision (bumped only when something changed)."""
        check_node_id(node_id)
        value = training.model_dump_json() if training is not None else None
        with self.store.write() as db:
            db.execute(_UPSERT, {"node_id": node_id, "online": None, "seen": 0,
                                 "agent_version": ""})
            cur = next(db.query("select training from nodes where node_id = ?",
                                [node_id]))["training"]
            if cur != value:
                db.execute("update nodes set training = ?, desired_revision = desired_revision"
                           " + 1 where node_id = ?", [value, node_id])
            rev = next(db.query("select desired_revision from nodes where node_id = ?",
                                [node_id]))["desired_revision"]
        logger.info("node %s: training windows %s (revision %d)", node_id,
                    "cleared" if training is None else f"set ({len(training.windows)})", rev)
        return rev

    def unassign(self, node_id: str, app: str) -> int:
        check_node_id(node_id)
        with self.store.write() as db:
            n = db.execute("delete from assignments where node_id = ? and app = ?",
                           [node_id, app]).rowcount
            if not n:
                raise NotFound("not_assigned", f"{app!r} is not assigned to node {node_id!r}")
            db.execute("update nodes set desired_revision = desired_revision + 1 "
                       "where node_id = ?", [node_id])
            rev = next(db.query("select desired_revision from nodes where node_id = ?",
                                [node_id]))["desired_revision"]
        logger.info("node %s: removed %s (revision %d)", node_id, app, rev)
        return rev

    def set_labels(self, node_id: str, site: str | None, group: str | None,
                   tags: list[str] | None) -> dict[str, Any]:
        """Where the node sits (rollout and subscription targets); None leaves a
        field as it is, "" clears it."""
        check_node_id(node_id)
        for name, v in (("site", site), ("group", group)):
            if v is not None and (not isinstance(v, str) or len(v) > 128):
                raise BadRequest("bad_labels", f"{name}: a string of at most 128 characters")
        if tags is not None and (not isinstance(tags, list) or len(tags) > 64 or any(
                not isinstance(t, str) or not t or len(t) > 64 for t in tags)):
            raise BadRequest("bad_labels", "tags: a list of at most 64 non-empty strings")
        with self.store.write() as db:
            db.execute(_UPSERT, {"node_id": node_id, "online": None, "seen": 0,
                                 "agent_version": ""})
            for col, v in (("site", site), ("grp", group)):
                if v is not None:
                    db.execute(f"update nodes set {col} = ? where node_id = ?",
                               [v or None, node_id])
            if tags is not None:
                db.execute("update nodes set tags = ? where node_id = ?",
                           [json.dumps(sorted(set(tags))) if tags else None, node_id])
        return self.get_node(node_id)

    # -- queries ---------------------------------------------------------------
    def desired(self, node_id: str) -> DesiredState:
        with self.store.read() as db:
            return self._desired(db, node_id)

    def all_desired(self) -> list[DesiredState]:
        """The desired state of every node that ever had one (for a republish)."""
        with self.store.read() as db:
            ids = [r["node_id"] for r in db.query(
                "select node_id from nodes where desired_revision > 0 order by node_id")]
            return [self._desired(db, node_id) for node_id in ids]

    @staticmethod
    def _desired(db: Database, node_id: str) -> DesiredState:
        rows = list(db.query(
            "select a.app, a.version, a.resources, a.upload, v.sha256, v.size "
            "from assignments a "
            "join app_versions v on v.name = a.app and v.version = a.version "
            "where a.node_id = ? order by a.app", [node_id]))
        node = list(db.query("select desired_revision, training from nodes where node_id = ?",
                             [node_id]))
        epoch = next(db.query("select value from store_meta where key = 'epoch'"))["value"]
        return DesiredState(
            node_id=node_id, revision=node[0]["desired_revision"] if node else 0, epoch=epoch,
            apps=[AppRef(name=r["app"], version=r["version"], sha256=r["sha256"], size=r["size"],
                         resources=json.loads(r["resources"]) if r["resources"] else None,
                         upload=r["upload"])
                  for r in rows],
            training=TrainingSchedule.model_validate_json(node[0]["training"])
            if node and node[0]["training"] else None,
        )

    def assignments(self, node_id: str) -> list[dict[str, Any]]:
        with self.store.read() as db:
            return list(db.query("select app, version, assigned_at, resources, upload "
                                 "from assignments "
                                 "where node_id = ? order by app", [node_id]))

    def list_nodes(self) -> list[dict[str, Any]]:
        with self.store.read() as db:
            rows = list(db.query("select * from nodes order by node_id"))
        return [self._node(r) for r in rows]

    def get_node(self, node_id: str) -> dict[str, Any]:
        check_node_id(node_id)
        with self.store.read() as db:
            rows = list(db.query("select * from nodes where node_id = ?", [node_id]))
        if not rows:
            raise NotFound("unknown_node", f"no node {node_id!r}")
        node = self._node(rows[0])
        node["assignments"] = self.assignments(node_id)
        node["desired"] = self.desired(node_id).model_dump()
        return node

    @staticmethod
    def _node(r: dict[str, Any]) -> dict[str, Any]:
        reported = json.loads(r["reported"]) if r["reported"] else None
        return {
            "node_id": r["node_id"], "online": bool(r["online"]), "last_seen": r["last_seen"],
            "first_seen": r["first_seen"], "agent_version": r["agent_version"],
            "http_url": r["http_url"], "desired_revision": r["desired_revision"],
            "training": json.loads(r["training"]) if r.get("training") else None,
            "site": r.get("site"), "group": r.get("grp"),
            "tags": json.loads(r["tags"]) if r.get("tags") else [],
            "reported_revision": reported["desired_revision"] if reported else None,
            "reported": reported,
        }

    def counts(self) -> dict[str, int]:
        with self.store.read() as db:
            r = next(db.query("select count(*) as nodes, coalesce(sum(online), 0) as online "
                              "from nodes"))
        return {"nodes": r["nodes"], "online": r["online"]}
