"""Remote operations on the node: the cloud's commands, run once, answered durably.

The AppStore publishes a :class:`~cloud_sync.schemas.Command` on the node's
``commands`` topic (only the AppStore's broker user may write there: the node's
ACL gives it read on its downward topics) and re-sends it until it gets an
answer. Here, on one thread of its own (never the MQTT network thread):

- a command for another node is refused (counted under ``command_wrong_node``
  in the reported state's ``rejected``), never run;
- a command past its ``expires_at`` (the node's clock) is answered ``expired``
  without running;
- each ``command_id`` runs at most once: its row in ``remote_commands`` (the
  node's SQLite) is written before it runs; a repeat of a finished one gets the
  stored answer again (``duplicate: true``), a repeat of one still running is
  ignored, one interrupted by an agent restart is answered ``failed``;
- the answer (:class:`~cloud_sync.schemas.CommandResult`) goes through the
  durable outbox on ``results`` and is resent until the AppStore acks it.

Operations: ``restart_app`` (the app's worker process stopped and started
again), ``diagnostics`` (a tar.gz bundle: logs tail, effective config with
secrets redacted, health, self-check), ``selfcheck`` (edge_node/selfcheck.py),
``doctor`` (every health check now, ``fix``: with the remedies; the fault
journal's summary -- edge_node/health, docs/faults.md), ``set_config`` (an app's hard-example policy / upload level, validated with
the node's own :class:`~edge_node.config.AppFeedbackConfig`, kept in
``remote_config`` so a restart keeps it; it wins over the config file's).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import json
import logging
import platform
import queue
import re
import shutil
import sqlite3
import tarfile
import threading
import time
from typing import Any

from pydantic import ValidationError
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from cloud_sync import schemas
from cloud_sync.errors import CloudSyncError, MessageRejected

from . import __version__, selfcheck
from .config import AppFeedbackConfig

logger = logging.getLogger(__name__)

migrations = Migrations("edge_node.remote")
#: keys whose values never leave the node in a diagnostics bundle
SECRET_KEY_RE = re.compile(r"pass(word)?|secret|token|authkey|private|credential", re.I)
_URL_CREDS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
REDACTED = "***"


@migrations()
def m001_remote(db: Database) -> None:
    db["remote_commands"].create(
        {"command_id": str, "op": str, "args": str, "by": str, "issued_at": float,
         "expires_at": float, "received_at": float, "state": str, "finished_at": float,
         "result": str, "runs": int, "repeats": int},
        pk="command_id", not_null={"op", "state"})
    db["remote_config"].create({"key": str, "value": str, "updated_at": float,
                                "command_id": str}, pk="key")


def redact_text(text: str) -> str:
    """URL credentials masked in free text (log lines)."""
    return _URL_CREDS_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with secret-named keys' values replaced and URL
    credentials (``rtsp://user:pw@host``) masked."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and SECRET_KEY_RE.search(key) and value not in (None, "", [], {}) \
            and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, str):
        return _URL_CREDS_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    return value


class LogRing(logging.Handler):
    """The last ``n`` log lines of this process (for diagnostics bundles)."""

    def __init__(self, n: int = 5000) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=n)
        self.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record)[:2000])
        except Exception:  # noqa: BLE001 - logging must never raise
            pass

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:]


class RemoteOps:
    """The node's side of remote operations; ``start()`` before the MQTT connect."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.node_id = agent.cfg.node_id
        self.topic = agent.topics.commands(self.node_id)
        self.results_topic = agent.topics.results(self.node_id)
        self._db: Database | None = None
        self._lock = threading.Lock()
        self._q: queue.Queue[schemas.Command | None] = queue.Queue(maxsize=1000)
        self._thread: threading.Thread | None = None
        self.logs = LogRing()
        self.stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle --------------------------------------------------------------
    def open(self) -> None:
        """Open the tables and apply the cloud's saved settings (before anything
        judges a result)."""
        if self._db is not None:
            return
        conn = sqlite3.connect(str(self.agent.cfg.data_dir / "node.db"),
                               check_same_thread=False, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 30000")
        self._db = Database(conn)
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrations.apply(self._db)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        for row in self._db.query("select key, value from remote_config"):
            if row["key"].startswith("feedback.apps."):
                self._apply_feedback(row["key"][len("feedback.apps."):], json.loads(row["value"]))

    def start(self) -> None:
        self.open()
        logging.getLogger().addHandler(self.logs)
        # commands cut short by a restart: answered failed (never run twice)
        for row in list(self._db.query(
                "select * from remote_commands where state = 'running'")):
            self._finish(row["command_id"], row["op"], "failed",
                         error="interrupted: the agent restarted while it ran")
        self._thread = threading.Thread(target=self._run, name="remote-ops", daemon=True)
        self._thread.start()
        self.agent.conn.subscribe(self.topic, self.on_message)

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.logs)
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(15)
            self._thread = None
        if self._db is not None:
            with self._lock:
                self._db.conn.close()
            self._db = None

    # -- inbound (MQTT network thread: validate and hand over) ------------------
    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            cmd = schemas.parse(schemas.Command, payload)
        except MessageRejected as err:
            self.agent.reconciler.count_rejected(f"command_{err.reason}", err.detail)
            return
        if cmd.node_id != self.node_id:
            self.agent.reconciler.count_rejected(
                "command_wrong_node", f"{cmd.command_id} is for {cmd.node_id!r}")
            return
        try:
            self._q.put_nowait(cmd)
        except queue.Full:  # the AppStore sends it again
            self.stats["dropped_queue_full"] += 1

    def _run(self) -> None:
        while (cmd := self._q.get()) is not None:
            try:
                self.handle(cmd)
            except Exception:  # noqa: BLE001 - one command must not stop the next
                logger.exception("command %s (%s) failed", cmd.command_id, cmd.op)

    # -- one command ------------------------------------------------------------
    def get(self, command_id: str) -> dict | None:
        with self._lock:
            rows = list(self._db.query("select * from remote_commands where command_id = ?",
                                       [command_id]))
        return rows[0] if rows else None

    def handle(self, cmd: schemas.Command) -> None:
        now = time.time()
        with self._lock:
            c = self._db.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("select state, result from remote_commands "
                                "where command_id = ?", [cmd.command_id]).fetchone()
                expired = now > cmd.expires_at
                if row is None:
                    c.execute(
                        "insert into remote_commands (command_id, op, args, by, issued_at,"
                        " expires_at, received_at, state, runs, repeats)"
                        " values (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                        [cmd.command_id, cmd.op, json.dumps(cmd.args), cmd.by, cmd.issued_at,
                         cmd.expires_at, now, "expired" if expired else "running",
                         0 if expired else 1])
                else:
                    c.execute("update remote_commands set repeats = repeats + 1 "
                              "where command_id = ?", [cmd.command_id])
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        if row is not None:
            self.stats["repeated"] += 1
            state, stored = row
            if state == "running":
                logger.info("command %s is still running: repeat ignored", cmd.command_id)
            elif stored:
                logger.info("command %s seen before (%s): its answer again", cmd.command_id,
                            state)
                self._send(schemas.CommandResult.model_validate_json(stored), duplicate=True)
            return
        if expired:
            self.stats["expired"] += 1
            logger.warning("command %s (%s) arrived %.0f s after it expired: not run",
                           cmd.command_id, cmd.op, now - cmd.expires_at)
            self._finish(cmd.command_id, cmd.op, "expired",
                         error=f"received {now - cmd.expires_at:.1f} s after expires_at; not run")
            return
        logger.info("command %s: %s %s (by %s)", cmd.command_id, cmd.op, cmd.args, cmd.by)
        self.stats[f"run_{cmd.op}"] += 1
        started = time.time()
        bundle: bytes | None = None
        try:
            args = schemas.COMMAND_ARGS[cmd.op].model_validate(cmd.args)
            out = getattr(self, f"_op_{cmd.op}")(cmd, args)
            if isinstance(out, tuple):
                out, bundle = out
            status, error = "done", None
        except ValidationError as err:
            e = err.errors()[0]
            out, status = {}, "failed"
            error = f"bad_args: {'.'.join(map(str, e['loc'])) or '(args)'}: {e['msg']}"
        except OpError as err:
            out, status, error = err.data, "failed", str(err)
        except Exception as err:  # noqa: BLE001 - answered, not raised
            logger.exception("command %s (%s) failed", cmd.command_id, cmd.op)
            out, status, error = {}, "failed", f"internal: {err}"[:2000]
        self._finish(cmd.command_id, cmd.op, status, out, error, started, bundle)
        self.agent.emit_event("command_run", severity="info" if status == "done" else "warning",
                              data={"command_id": cmd.command_id, "op": cmd.op, "by": cmd.by,
                                    "status": status, "error": error})

    def _finish(self, command_id: str, op: str, status: str, out: dict | None = None,
                error: str | None = None, started: float | None = None,
                bundle: bytes | None = None) -> None:
        res = schemas.CommandResult(
            command_id=command_id, node_id=self.node_id, op=op, status=status,
            started_at=started, finished_at=time.time(), result=out or {}, error=error,
            bundle_b64=base64.b64encode(bundle).decode() if bundle is not None else None,
            bundle_sha256=hashlib.sha256(bundle).hexdigest() if bundle is not None else None)
        with self._lock, self._db.conn:
            self._db.conn.execute(
                "update remote_commands set state = ?, finished_at = ?, result = ? "
                "where command_id = ?", [status, res.finished_at, res.model_dump_json(),
                                         command_id])
        self._send(res)

    def _send(self, res: schemas.CommandResult, duplicate: bool = False) -> None:
        if duplicate:
            res = res.model_copy(update={"msg_id": schemas.new_msg_id(), "duplicate": True,
                                         "ts": time.time()})
        try:
            self.agent.outbox.put(self.results_topic, res.to_bytes(), res.msg_id,
                                  kind="result")
        except CloudSyncError as err:
            logger.warning("result of command %s not queued: %s", res.command_id, err)

    # -- operations -------------------------------------------------------------
    def _op_restart_app(self, cmd: schemas.Command, args: schemas.RestartAppArgs) -> dict:
        serving = self.agent.reconciler.serving(args.app)
        if serving is None:
            raise OpError("unknown_app", f"{args.app!r} does not run on this node "
                          f"(runs: {sorted(a.name for a in self.agent.reconciler.reports())})")
        key = serving["key"]
        before = self.agent.supervisor.status().get(key, {}).get("pid")
        self.agent.supervisor.restart(key)
        after = self.agent.supervisor.status().get(key, {}).get("pid")
        app = self.agent.registry.get(args.app)
        if app is not None:
            app.ready = True
        self.agent.emit_event("app_restarted", app=args.app,
                              data={"worker": key, "old_pid": before, "new_pid": after,
                                    "command_id": cmd.command_id, "by": cmd.by})
        return {"app": args.app, "worker": key, "old_pid": before, "new_pid": after}

    def _op_selfcheck(self, cmd: schemas.Command, args: schemas.SelfcheckArgs) -> dict:
        return selfcheck.run(self.agent)

    def _op_doctor(self, cmd: schemas.Command, args: schemas.DoctorArgs) -> dict:
        """``aidc edge doctor`` from the cloud: every check, remedies with ``fix``."""
        return self.agent.doctor(fix=args.fix)

    def _op_set_config(self, cmd: schemas.Command, args: schemas.SetConfigArgs) -> dict:
        key = f"feedback.apps.{args.app}"
        if args.feedback is None:
            value = None
        else:
            try:  # the node's own model is the judge of its config
                value = AppFeedbackConfig.model_validate(
                    args.feedback.model_dump(exclude_none=True)).model_dump(exclude_none=True)
            except ValidationError as err:
                e = err.errors()[0]
                raise OpError("bad_config", f"feedback.{'.'.join(map(str, e['loc']))}: "
                              f"{e['msg']}") from err
        with self._lock, self._db.conn:
            if value is None:
                self._db.conn.execute("delete from remote_config where key = ?", [key])
            else:
                self._db.conn.execute(
                    "insert into remote_config (key, value, updated_at, command_id) "
                    "values (?, ?, ?, ?) on conflict(key) do update set value = excluded.value,"
                    " updated_at = excluded.updated_at, command_id = excluded.command_id",
                    [key, json.dumps(value), time.time(), cmd.command_id])
        effective = self._apply_feedback(args.app, value)
        self.agent.emit_event("config_changed", app=args.app,
                              data={"key": key, "value": value, "command_id": cmd.command_id,
                                    "by": cmd.by})
        return {"app": args.app, "feedback": value, "effective": effective}

    def _apply_feedback(self, app: str, value: dict | None) -> dict:
        """Put the cloud's settings for ``app`` in force (None: the config file's)."""
        fb = self.agent.cfg.feedback
        base = getattr(self.agent, "_file_feedback_apps", None)
        if base is None:  # the config file's own, kept to go back to
            base = self.agent._file_feedback_apps = {k: v.model_copy()
                                                     for k, v in fb.apps.items()}
        if value is None:
            if app in base:
                fb.apps[app] = base[app].model_copy()
            else:
                fb.apps.pop(app, None)
        else:
            merged = {**(base[app].model_dump(exclude_none=True) if app in base else {}),
                      **value}
            fb.apps[app] = AppFeedbackConfig.model_validate(merged)
        for k in [k for k in self.agent._policies if k[0] == app]:
            self.agent._policies.pop(k, None)  # judged afresh with the new settings
        served = self.agent.registry.get(app)
        policy = self.agent._policy(served) if served is not None else None
        return {"config": fb.apps[app].model_dump(exclude_none=True) if app in fb.apps else {},
                "policy": dataclasses.asdict(policy) if policy is not None else None,
                "upload": self.agent.capture.upload_level(app)}

    def _op_diagnostics(self, cmd: schemas.Command,
                        args: schemas.DiagnosticsArgs) -> tuple[dict, bytes]:
        agent = self.agent
        cfg = agent.cfg
        health = {
            "node_id": self.node_id, "ts": time.time(),
            "reported": agent.reported_state().model_dump(mode="json"),
            "workers": agent.supervisor.status(),
            "outbox": agent.outbox.stats(),
            "disk": _disk(cfg.data_dir),
            "versions": _versions(agent),
            "mqtt": dict(agent.conn.stats), "connected": agent.conn.connected.is_set(),
            "remote": dict(self.stats),
        }
        check = selfcheck.run(agent)
        config = redact(cfg.model_dump(mode="json"))
        logs = [redact_text(x) for x in self.logs.tail(args.log_lines)]
        workers = agent.supervisor.status()
        parts = {
            "logs.txt": ("\n".join(logs) + "\n").encode(),
            "workers.txt": "".join(
                f"== {key} ({w.get('state')}, pid {w.get('pid')})\n"
                f"{redact_text(agent.supervisor.output_tail(key, 200))}\n"
                for key, w in sorted(workers.items())).encode(),
            "config.json": _json(config),
            "health.json": _json(health),
            "selfcheck.json": _json(check),
        }
        parts["manifest.json"] = _json({
            "node_id": self.node_id, "command_id": cmd.command_id, "created_at": time.time(),
            "agent_version": __version__,
            "parts": {k: len(v) for k, v in parts.items()}, "log_lines": len(logs)})
        bundle = _tar(parts)
        while len(bundle) > schemas.MAX_BUNDLE_BYTES and logs:  # too big: fewer log lines
            logs = logs[len(logs) // 2:] if len(logs) > 1 else []
            parts["logs.txt"] = ("\n".join(logs) + "\n").encode()
            parts["workers.txt"] = parts["workers.txt"][-64 * 1024:]
            bundle = _tar(parts)
        return ({"parts": sorted(parts), "bytes": len(bundle), "log_lines": len(logs),
                 "selfcheck_ok": check["ok"]}, bundle)


class OpError(Exception):
    """An operation that cannot be done, answered ``failed`` with ``reason: detail``."""

    def __init__(self, reason: str, detail: str, data: dict | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.data = data or {}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _tar(parts: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(f"diagnostics/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _disk(path: Any) -> dict:
    du = shutil.disk_usage(path)
    used = 0
    for sub in ("blobs", "apps", "samples", "jobs"):
        p = path / sub
        if p.exists():
            used += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    db = path / "node.db"
    return {"path": str(path), "free_mb": round(du.free / 2**20, 1),
            "total_mb": round(du.total / 2**20, 1),
            "data_mb": round((used + (db.stat().st_size if db.exists() else 0)) / 2**20, 2)}


def _versions(agent: Any) -> dict:
    out: dict[str, Any] = {"agent": __version__, "python": platform.python_version(),
                           "platform": platform.platform()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    out["apps"] = [{"name": a.name, "version": a.version, "status": a.status,
                    "variant": a.variant} for a in agent.reconciler.reports()]
    out["installed"] = [{k: r[k] for k in ("name", "version", "sha256")}
                        for r in agent.store.all_installed()]
    return out
