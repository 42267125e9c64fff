"""Channels and subscriptions: which version of an app a part of the fleet should
run, kept true as nodes come and go.

- A **channel** (``stable``, ``beta``, any name) of an app points to one
  published version: ``PUT /api/v1/apps/{app}/channels/{channel}``
  ``{"version": "1.2.0"}``, or a rollout started with ``"channel": "stable"``
  moves it when every wave passed (docs/fleet.md).
- A **subscription** gives an app's channel to a target (nodes, a group, a
  site, tags, or the whole fleet, as for rollouts): ``POST
  /api/v1/subscriptions`` ``{"app": "digits", "channel": "stable", "target":
  {"group": "cameras"}}``.
- **Reconciled continuously** (:meth:`Subscriptions.reconcile`, from the rollout
  engine's thread every few seconds): every node a subscription covers that
  does not run the app gets the channel's version in its desired state -- a
  node enrolled or labelled into a group later, or one that was offline,
  converges on its own. A node that already has the app keeps its version:
  versions move by rollouts (which move the channel when they succeed), never
  behind an operator's back. Two subscriptions giving one node the same app on
  different channels: the first created wins, and the conflict is shown on the
  other.
- Deleting a subscription stops new nodes from getting the app; nodes keep what
  they run (``aidc store unassign`` removes an app).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .db import Store
from .errors import BadRequest, NotFound
from .rollouts import Target, resolve_target

logger = logging.getLogger(__name__)

CHANNEL_RE = r"^[a-z0-9][a-z0-9._-]{0,31}$"


class SubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    app: str = Field(min_length=1, max_length=128)
    channel: str = Field(default="stable", pattern=CHANNEL_RE)
    target: Target
    by: str | None = Field(default=None, max_length=200)


class Subscriptions:
    def __init__(self, store: Store, catalog: Any,
                 assign: Callable[[str, str, str], Any],
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.catalog, self.assign, self.clock = store, catalog, assign, clock
        self.stats: dict[str, int] = {"assigned": 0, "conflicts": 0}

    # -- channels ----------------------------------------------------------------
    def set_channel(self, app: str, channel: str, version: str, by: str | None = None
                    ) -> dict[str, Any]:
        import re

        if not isinstance(channel, str) or not re.match(CHANNEL_RE, channel):
            raise BadRequest("bad_channel", f"{channel!r}: lower-case letters, digits, '.', "
                             "'_', '-', at most 32")
        if not isinstance(version, str) or not version:
            raise BadRequest("bad_version", "give the version the channel points to")
        self.catalog.get_version(app, version)  # 404 unknown_version
        now = self.clock()
        with self.store.write() as db:
            db.execute("insert into channels (app, channel, version, updated_at, updated_by) "
                       "values (?, ?, ?, ?, ?) on conflict(app, channel) do update set "
                       "version = excluded.version, updated_at = excluded.updated_at, "
                       "updated_by = excluded.updated_by", [app, channel, version, now, by])
        logger.info("channel %s@%s -> %s (by %s)", app, channel, version, by or "?")
        return {"app": app, "channel": channel, "version": version, "updated_at": now,
                "updated_by": by}

    def channels(self, app: str) -> list[dict[str, Any]]:
        with self.store.read() as db:
            return list(db.query("select app, channel, version, updated_at, updated_by from "
                                 "channels where app = ? order by channel", [app]))

    # -- subscriptions -----------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            req = SubscriptionRequest.model_validate(body)
        except ValidationError as err:
            raise BadRequest("bad_subscription",
                             json.loads(err.json(include_url=False))) from err
        if not any(c["channel"] == req.channel for c in self.channels(req.app)):
            raise BadRequest("unknown_channel", f"{req.app} has no channel {req.channel!r}: "
                             f"set it first (PUT /api/v1/apps/{req.app}/channels/"
                             f"{req.channel})")
        now = self.clock()
        with self.store.write() as db:
            sid = db["subscriptions"].insert({
                "app": req.app, "channel": req.channel,
                "target": req.target.model_dump_json(exclude_defaults=True),
                "created_at": now, "created_by": req.by}).last_pk
        logger.info("subscription %s: %s@%s to %s", sid, req.app, req.channel,
                    req.target.model_dump(exclude_defaults=True))
        self.reconcile()
        return self.get(sid)

    def delete(self, sid: int) -> dict[str, Any]:
        sub = self.get(sid)
        with self.store.write() as db:
            db.execute("delete from subscriptions where id = ?", [sid])
        return sub

    def get(self, sid: int) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from subscriptions where id = ?", [sid]))
        if not rows:
            raise NotFound("unknown_subscription", f"no subscription {sid}")
        return self._row(rows[0])

    def list(self, app: str | None = None) -> list[dict[str, Any]]:
        sql = "select * from subscriptions" + (" where app = ?" if app else "") + " order by id"
        with self.store.read() as db:
            rows = list(db.query(sql, [app] if app else []))
        return [self._row(r) for r in rows]

    def _row(self, r: dict[str, Any]) -> dict[str, Any]:
        target = Target.model_validate_json(r["target"])
        with self.store.read() as db:
            nodes = resolve_target(db, target, strict=False)
            ch = list(db.query("select version from channels where app = ? and channel = ?",
                               [r["app"], r["channel"]]))
            running = {x["node_id"]: x["version"] for x in db.query(
                "select node_id, version from assignments where app = ?", [r["app"]])}
        return {"id": r["id"], "app": r["app"], "channel": r["channel"],
                "version": ch[0]["version"] if ch else None,
                "target": json.loads(r["target"]), "created_at": r["created_at"],
                "created_by": r["created_by"], "nodes": len(nodes),
                "running": sum(1 for n in nodes if n in running),
                "on_channel_version": sum(1 for n in nodes if ch and
                                          running.get(n) == ch[0]["version"])}

    # -- reconcile ---------------------------------------------------------------
    def reconcile(self) -> int:
        """Give every covered node that lacks the app its channel's version; how many
        nodes were given one."""
        with self.store.read() as db:
            subs = list(db.query("select s.id, s.app, s.channel, s.target, c.version from "
                                 "subscriptions s join channels c on c.app = s.app and "
                                 "c.channel = s.channel order by s.id"))
            if not subs:
                return 0
            have = {(r["node_id"], r["app"]) for r in db.query(
                "select node_id, app from assignments")}
            wanted: dict[tuple[str, str], tuple[str, int]] = {}
            for s in subs:
                for node in resolve_target(db, Target.model_validate_json(s["target"]),
                                           strict=False):
                    key = (node, s["app"])
                    if key in have:
                        continue
                    if key in wanted and wanted[key][0] != s["version"]:
                        self.stats["conflicts"] += 1
                        continue  # the first subscription wins
                    wanted.setdefault(key, (s["version"], s["id"]))
        for (node, app), (version, sid) in wanted.items():
            try:
                self.assign(node, app, version)
                self.stats["assigned"] += 1
                logger.info("subscription %s: %s gets %s %s", sid, node, app, version)
            except Exception:  # noqa: BLE001 - one node must not stop the others
                logger.exception("subscription %s: assigning %s %s to %s", sid, app,
                                 version, node)
        return len(wanted)
