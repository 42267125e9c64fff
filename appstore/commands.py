"""Remote operations from the cloud: commands to nodes, their results, an audit log.

An operator asks (``POST /api/v1/nodes/{id}/commands``); the command is a row
in ``commands`` (state ``queued``) and a line in ``audit_log`` before anything
is sent. One thread here then:

- sends every open command to its node on the node's ``commands`` topic while
  the node is online, again every ``resend_s`` until it answers (the broker
  keeps nothing for an offline node: a node coming back gets it within
  ``resend_s``); the node runs a command id at most once;
- marks a command past its ``expires_at`` without an answer ``expired`` (a node
  that gets one late answers ``expired`` itself, without running it);
- takes the nodes' answers from their ``results`` topics (a shared
  subscription), stores them (a diagnostics bundle in the content-addressed
  ``bundles`` store), appends the outcome to the audit log, and then acks them
  on the node's ``ack`` topic so its outbox stops resending.

States: ``queued`` (not sent yet) -> ``sent`` -> ``done`` | ``failed`` |
``expired``. A repeated ``command_id`` returns the stored command, never a
second run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections import Counter
from typing import Any

from pydantic import ValidationError

from cloud_sync.connection import MqttConnection
from cloud_sync.errors import MessageRejected
from cloud_sync.schemas import (COMMAND_ARGS, COMMAND_ID_RE, COMMAND_OPS, Ack, AckItem, Command,
                                CommandResult, parse)
from cloud_sync.topics import Topics

from .blobstore import ContentStore
from .db import Store
from .errors import BadRequest, Conflict, NotFound
from .fleet import recover_msg_id
from .registry import Registry, check_node_id

logger = logging.getLogger(__name__)

OPEN = ("queued", "sent")
FINAL = ("done", "failed", "expired")
MIN_TTL_S, MAX_TTL_S, DEFAULT_TTL_S = 1, 7 * 86400, 600


class Commands:
    def __init__(self, store: Store, registry: Registry, conn: MqttConnection, topics: Topics,
                 bundles: ContentStore, shared_group: str | None = "appstore",
                 resend_s: float = 5.0, tick_s: float = 0.5) -> None:
        self.store = store
        self.registry = registry
        self.conn = conn
        self.topics = topics
        self.bundles = bundles
        self.shared_group = shared_group
        self.resend_s = resend_s
        self.tick_s = tick_s
        self._q: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=10000)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Subscribe to the fleet's results (before ``conn.start()``) and start the thread."""
        t = self.topics
        self.conn.subscribe(t.shared(self.shared_group, t.all_nodes("results")), self._on_result)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="appstore-commands", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def nudge(self) -> None:
        self._wake.set()

    def _on_result(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            self._q.put_nowait((topic, payload))
        except queue.Full:
            self.stats["dropped_queue_full"] += 1  # unacked: the node sends it again
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            try:
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    self._ingest(*item)
                self._expire()
                self._send_due()
            except Exception:  # noqa: BLE001 - the loop must not die
                self.stats["loop_error"] += 1
                logger.exception("remote operations: a tick failed")
                self._stop.wait(1.0)

    # -- operators -----------------------------------------------------------------
    def create(self, node_id: str, body: dict[str, Any], actor: str | None = None,
               ) -> tuple[dict[str, Any], bool]:
        """A new command (or the stored one for a repeated ``command_id``): (row, created).

        ``actor``: who asks, the authenticated operator (the REST API passes it);
        the body's ``by`` is then only a note in the audit's detail. Without an
        actor (direct callers) the ``by`` is the actor, as given."""
        check_node_id(node_id)
        op = body.get("op")
        if op not in COMMAND_OPS:
            raise BadRequest("bad_op", f"op {op!r} is not one of {', '.join(COMMAND_OPS)}")
        raw_args = body.get("args") or {}
        if not isinstance(raw_args, dict):
            raise BadRequest("bad_args", "args is a JSON object")
        try:
            args = COMMAND_ARGS[op].model_validate(raw_args).model_dump(exclude_unset=True)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(map(str, e["loc"])) or "(args)"
            raise BadRequest("bad_args", f"{op}: {where}: {e['msg']}") from err
        ttl = body.get("ttl_s", DEFAULT_TTL_S)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or \
                not MIN_TTL_S <= ttl <= MAX_TTL_S:
            raise BadRequest("bad_ttl", f"ttl_s is {MIN_TTL_S}..{MAX_TTL_S} seconds")
        by = body.get("by")
        if by is not None and (not isinstance(by, str) or len(by) > 64):
            raise BadRequest("bad_by", "by (who asks) is a string of at most 64 characters")
        note = f"; by {by!r}" if actor is not None and by and by != actor else ""
        if actor is not None:
            by = actor
        cid = body.get("command_id")
        if cid is None:
            cid = f"c{int(time.time())}-{secrets.token_hex(6)}"
        if not isinstance(cid, str) or not re.match(COMMAND_ID_RE, cid):
            raise BadRequest("bad_command_id", "command_id: 8-64 of letters, digits, '_', "
                             "'-', '.', starting with a letter or digit")
        self.registry.get_node(node_id)  # 404 unknown_node
        now = time.time()
        with self.store.write() as db:
            old = list(db.query("select * from commands where command_id = ?", [cid]))
            if old:
                o = old[0]
                if (o["node_id"], o["op"], json.loads(o["args"])) != (node_id, op, args):
                    raise Conflict("command_id_conflict",
                                   f"{cid} is already {o['op']} on {o['node_id']} "
                                   "with other args")
                self._audit(db, now, by, "command_repeated", node_id, cid, op, args,
                            o["state"], "the stored command; not run again" + note)
            else:
                db["commands"].insert({
                    "command_id": cid, "node_id": node_id, "op": op, "args": json.dumps(args),
                    "created_by": by, "created_at": now, "expires_at": now + ttl,
                    "state": "queued", "sends": 0, "duplicates": 0, "updated_at": now})
                self._audit(db, now, by, "command_requested", node_id, cid, op, args,
                            "queued", f"ttl {ttl:g} s{note}")
        self._wake.set()
        if not old:
            logger.info("command %s: %s on %s by %s", cid, op, node_id, by)
        return self.get(cid), not old

    def get(self, command_id: str) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from commands where command_id = ?", [command_id]))
        if not rows:
            raise NotFound("unknown_command", f"no command {command_id!r}")
        return _public(rows[0])

    def list(self, node: str | None = None, state: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        where, params = [], []
        if node:
            where.append("node_id = ?")
            params.append(node)
        if state:
            where.append("state = ?")
            params.append(state)
        sql = ("select * from commands" + (" where " + " and ".join(where) if where else "")
               + " order by created_at desc, rowid desc limit ?")
        with self.store.read() as db:
            rows = list(db.query(sql, [*params, max(1, min(limit, 1000))]))
        return [_public(r) for r in rows]  # results are small: bundles are apart

    def bundle_path(self, command_id: str) -> Any:
        cmd = self.get(command_id)
        sha = cmd.get("bundle_sha256")
        path = self.bundles.path(sha, "tar.gz") if sha else None
        if path is None:
            raise NotFound("no_bundle", f"command {command_id} has no diagnostics bundle"
                           + ("" if cmd["op"] == "diagnostics" else f" (it is {cmd['op']})")
                           + (f" (state {cmd['state']})" if cmd["state"] != "done" else ""))
        return path

    def audit(self, node: str | None = None, by: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        where, params = [], []
        for col, v in (("node_id", node), ("actor", by)):
            if v:
                where.append(f"{col} = ?")
                params.append(v)
        sql = ("select * from audit_log" + (" where " + " and ".join(where) if where else "")
               + " order by id desc limit ?")
        with self.store.read() as db:
            rows = list(db.query(sql, [*params, max(1, min(limit, 1000))]))
        for r in rows:
            r["args"] = json.loads(r["args"]) if r.get("args") else None
        return rows

    @staticmethod
    def _audit(db: Any, ts: float, actor: str | None, action: str, node_id: str,
               command_id: str, op: str, args: Any, outcome: str, detail: str = "") -> None:
        db["audit_log"].insert({"ts": ts, "actor": actor, "action": action, "node_id": node_id,
                                "command_id": command_id, "op": op,
                                "args": json.dumps(args) if args is not None else None,
                                "outcome": outcome, "detail": detail[:2000]})

    # -- the thread ----------------------------------------------------------------
    def _expire(self) -> None:
        now = time.time()
        with self.store.write() as db:
            rows = list(db.query("select * from commands where state in ('queued', 'sent') "
                                 "and expires_at < ?", [now]))
            for r in rows:
                detail = ("never sent: the node was offline until it expired"
                          if r["state"] == "queued" else "sent, no answer before it expired")
                db.execute("update commands set state = 'expired', error = ?, updated_at = ?, "
                           "finished_at = ? where command_id = ?",
                           [detail, now, now, r["command_id"]])
                self._audit(db, now, r["created_by"], "command_expired", r["node_id"],
                            r["command_id"], r["op"], None, "expired", detail)
        if rows:
            self.stats["expired"] += len(rows)
            logger.info("%d command(s) expired", len(rows))

    def _send_due(self) -> None:
        if not self.conn.connected.is_set():
            return
        now = time.time()
        with self.store.read() as db:
            rows = list(db.query(
                "select c.* from commands c join nodes n on n.node_id = c.node_id "
                "where c.state in ('queued', 'sent') and n.online = 1 and c.expires_at >= ? "
                "and (c.sent_at is null or c.sent_at <= ?) order by c.created_at limit 500",
                [now, now - self.resend_s]))
        if not rows:
            return
        # claim them first: with several AppStore workers on one database, the one
        # whose update finds sent_at as it read it sends; the others skip the row
        with self.store.write() as db:
            rows = [r for r in rows if db.execute(
                "update commands set sent_at = ? where command_id = ? and "
                "coalesce(sent_at, 0) = ? and state in ('queued', 'sent')",
                [now, r["command_id"], r["sent_at"] or 0]).rowcount]
        sent = []
        for r in rows:
            msg = Command(command_id=r["command_id"], node_id=r["node_id"], op=r["op"],
                          args=json.loads(r["args"]), issued_at=r["created_at"],
                          expires_at=r["expires_at"], by=r["created_by"])
            if self.conn.publish(self.topics.commands(r["node_id"]), msg.to_bytes(), qos=1):
                sent.append(r["command_id"])
        if sent:
            self.stats["sent"] += len(sent)
            with self.store.write() as db:
                for cid in sent:
                    db.execute("update commands set state = case when state = 'queued' then "
                               "'sent' else state end, sent_at = ?, sends = sends + 1, "
                               "updated_at = ? where command_id = ?", [now, now, cid])

    def _ingest(self, topic: str, payload: bytes) -> None:
        try:
            node_id, _ = self.topics.parse(topic)
        except MessageRejected:
            self.stats["rejected_bad_topic"] += 1
            return
        item: AckItem | None
        try:
            res = parse(CommandResult, payload, max_bytes=2 << 20)
            if res.node_id != node_id:
                raise MessageRejected("node_mismatch",
                                      f"result node_id {res.node_id!r} on {node_id!r}'s topic")
            item = self._store_result(node_id, res)
        except MessageRejected as err:
            self.stats[f"rejected_{err.reason}"] += 1
            logger.warning("rejected a result from %s: %s", node_id, err)
            mid = recover_msg_id(payload)
            item = AckItem(msg_id=mid, ok=False, reason=err.reason) if mid else None
        if item is not None:
            ok = self.conn.publish(self.topics.ack(node_id), Ack(acks=[item]).to_bytes(), qos=1)
            self.stats["acks_sent" if ok else "acks_unsent"] += 1

    def _store_result(self, node_id: str, res: CommandResult) -> AckItem:
        bundle_sha = None
        if res.bundle_b64 is not None:
            try:
                data = base64.b64decode(res.bundle_b64, validate=True)
            except (binascii.Error, ValueError) as err:
                raise MessageRejected("bad_bundle", f"not base64: {err}") from None
            sha = hashlib.sha256(data).hexdigest()
            if sha != res.bundle_sha256:
                raise MessageRejected("bad_bundle", f"bundle sha256 {sha} != {res.bundle_sha256}")
            bundle_sha, _ = self.bundles.put_bytes(data, "tar.gz")
        now = time.time()
        with self.store.write() as db:
            rows = list(db.query("select * from commands where command_id = ?",
                                 [res.command_id]))
            if not rows or rows[0]["node_id"] != node_id:
                raise MessageRejected("unknown_command",
                                      f"{res.command_id} was not sent to {node_id}")
            r = rows[0]
            late_truth = r["state"] == "expired" and res.status in ("done", "failed")
            if r["state"] in OPEN or late_truth:
                state = "failed" if res.status == "rejected" else res.status
                db.execute(
                    "update commands set state = ?, result = ?, error = ?, started_at = ?, "
                    "finished_at = ?, bundle_sha256 = ?, updated_at = ? where command_id = ?",
                    [state, json.dumps(res.result), res.error, res.started_at,
                     res.finished_at or res.ts, bundle_sha, now, res.command_id])
                self._audit(db, now, r["created_by"], "command_finished", node_id,
                            res.command_id, r["op"], None, state,
                            res.error or ("answered after the AppStore had marked it expired"
                                          if late_truth else ""))
                self.stats[f"result_{state}"] += 1
                logger.info("command %s on %s: %s%s", res.command_id, node_id, state,
                            f" ({res.error})" if res.error else "")
            else:  # a node's repeat (duplicate) or a resend the ack missed
                db.execute("update commands set duplicates = duplicates + 1, updated_at = ? "
                           "where command_id = ?", [now, res.command_id])
                self.stats["result_duplicate"] += 1
        return AckItem(msg_id=res.msg_id, ok=True)


def _public(r: dict[str, Any], with_result: bool = True) -> dict[str, Any]:
    out = {k: r[k] for k in ("command_id", "node_id", "op", "state", "created_by",
                             "created_at", "expires_at", "sent_at", "sends", "started_at",
                             "finished_at", "error", "duplicates", "bundle_sha256")}
    out["args"] = json.loads(r["args"]) if r.get("args") else {}
    if with_result:
        out["result"] = json.loads(r["result"]) if r.get("result") else None
    if r.get("bundle_sha256"):
        out["bundle_url"] = f"/api/v1/commands/{r['command_id']}/bundle"
    return out


def make_blueprint(commands: Commands) -> Any:
    """The REST endpoints of remote operations, under ``/api/v1``."""
    from flask import Blueprint, jsonify, request, send_file

    from .auth import actor
    bp = Blueprint("commands_api", __name__, url_prefix="/api/v1")

    def _limit() -> int:
        try:
            return int(request.args.get("limit", "100"))
        except ValueError as err:
            raise BadRequest("bad_limit", "limit must be an integer") from err

    @bp.post("/nodes/<node_id>/commands")
    def command_create(node_id: str) -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest("bad_json", 'the body must be a JSON object: {"op": ..., '
                             '"args": {...}, "ttl_s": 600, "by": "ops-1"}')
        row, created = commands.create(node_id, body, actor())
        return jsonify(row), 201 if created else 200

    @bp.get("/commands")
    def command_list() -> Any:
        a = request.args
        return jsonify({"commands": commands.list(a.get("node"), a.get("state"), _limit())})

    @bp.get("/commands/<command_id>")
    def command_get(command_id: str) -> Any:
        return jsonify(commands.get(command_id))

    @bp.get("/commands/<command_id>/bundle")
    def command_bundle(command_id: str) -> Any:
        path = commands.bundle_path(command_id)
        return send_file(path, mimetype="application/gzip", as_attachment=True,
                         download_name=f"diagnostics-{command_id}.tar.gz")

    @bp.get("/audit")
    def audit() -> Any:
        a = request.args
        return jsonify({"audit": commands.audit(a.get("node"), a.get("by"), _limit())})

    return bp
