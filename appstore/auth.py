"""Operator accounts, API tokens and roles for the AppStore REST API.

An operator is a name, a role and one API token. The token is 256 random bits
(``aidc_`` + 43 URL-safe characters), shown once when the operator is made;
the AppStore keeps only its sha256 (table ``operators``, migration m013). A
request carries it as ``Authorization: Bearer <token>``.

Roles, each including the one before it:

- ``viewer``: every ``GET`` (catalog, fleet, rollouts, commands, audit, stats);
- ``operator``: also assign/unassign, training windows, labels, channels,
  subscriptions, rollouts and their actions, remote commands, retrains;
- ``admin``: also publishing packages, enrolment tokens, revoking nodes and
  operator management.

Open (no token): ``GET /api/v1/health`` and ``POST /api/v1/enrol`` (which a
one-time enrolment token authenticates). The table of routes is
:data:`ROUTE_ROLES` (docs/security.md); a route not in it needs ``viewer``
for ``GET``/``HEAD`` and ``admin`` otherwise, so a new route is never open by
mistake.

Refusals are 401 ``unauthenticated`` (no, unknown, malformed, revoked or
expired token; with ``WWW-Authenticate: Bearer``) or 403 ``forbidden`` ("needs
role operator"); each is counted in ``GET /api/v1/stats`` ``rejections`` as
``auth_<reason>`` with the caller's address, and logged.

First start: with ``api_auth = "token"`` and no operator in the database, the
AppStore makes an ``admin`` operator and writes its token to
``<data_dir>/admin.token`` (mode 0600), in the same transaction, so two
workers starting together make one.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from .db import Store
from .errors import AppStoreError, BadRequest, Conflict, Forbidden, NotFound

logger = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
TOKEN_PREFIX = "aidc_"
TOKEN_FILE = "admin.token"
BOOTSTRAP_NAME = "admin"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,200}$")
#: last_used_at is written at most this often per operator (a write per request
#: would cost more than the request)
LAST_USED_RESOLUTION_S = 60.0
#: refusals of one reason are written to the database at most this often
COUNT_FLUSH_S = 1.0
#: the longest expiry one may give a token (10 years)
MAX_EXPIRY_S = 10 * 365 * 86400

#: Flask endpoint -> the role it needs; None: open. Endpoints not named here
#: need viewer for GET/HEAD and admin for anything else.
ROUTE_ROLES: dict[str, str | None] = {
    "api.health": None,
    "api.enrol": None,
    # operator: day-to-day fleet work
    "api.assign": "operator",
    "api.unassign": "operator",
    "api.set_training": "operator",
    "api.clear_training": "operator",
    "api.node_labels": "operator",
    "api.set_channel": "operator",
    "api.subscribe": "operator",
    "api.unsubscribe": "operator",
    "api.rollout_create": "operator",
    "api.rollout_action": "operator",
    "api.retrain": "operator",
    "commands_api.command_create": "operator",
    # admin: what changes who or what the fleet trusts
    "api.upload": "admin",
    "api.token_create": "admin",
    "api.revoke": "admin",
    "api.operators": "admin",
    "api.operator_create": "admin",
    "api.operator_revoke": "admin",
}


class Unauthenticated(AppStoreError):
    """No valid API token (401)."""

    status = 401
    default_reason = "unauthenticated"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 bits


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``: reachable from this machine only."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest("bad_name", "an operator name is 1-64 of letters, digits, '_', '.', "
                         "'@', '-', starting with a letter or digit")
    return name


def check_role(role: Any) -> str:
    if role not in RANK:
        raise BadRequest("bad_role", f"role {role!r} is not one of {', '.join(ROLES)}")
    return str(role)


def local_actor() -> str:
    """Who runs a local CLI command (no server, no token): ``local:<unix user>``."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local:?"


def _public(r: dict[str, Any], now: float) -> dict[str, Any]:
    state = ("revoked" if r["revoked_at"] else
             "expired" if r["expires_at"] is not None and r["expires_at"] <= now else "active")
    return {"name": r["name"], "role": r["role"], "state": state,
            "created_at": r["created_at"], "created_by": r["created_by"],
            "last_used_at": r["last_used_at"], "expires_at": r["expires_at"],
            "revoked_at": r["revoked_at"], "revoked_by": r["revoked_by"]}


class Operators:
    """The ``operators`` table: make, list, revoke, authenticate, bootstrap."""

    def __init__(self, store: Store, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock
        self._log_lock = threading.Lock()
        self._logged: dict[tuple[str, str], float] = {}
        #: a reader connection of its own for authenticate(), kept open: a fresh
        #: one per request would parse the whole schema each time (~0.2 ms).
        #: Outside a transaction every query sees the latest commit, so a token
        #: revoked by another worker or the CLI is refused at once.
        self._reader: Any = None
        self._reader_lock = threading.Lock()
        #: refusals not written yet: reason -> (count, last at, last detail)
        self._pending: dict[str, tuple[int, float, str]] = {}
        self._flushed: dict[str, float] = {}
        self._count_lock = threading.Lock()

    def flush(self, only: str | None = None) -> None:
        """Write the refusals counted since the last write (one upsert a reason)."""
        with self._count_lock:
            todo = {r: v for r, v in self._pending.items() if only in (None, r)}
            for r in todo:
                del self._pending[r]
                self._flushed[r] = self.clock()
        if not todo:
            return
        try:
            with self.store.write() as db:
                for reason, (n, at, line) in todo.items():
                    db.execute(
                        "insert into rejections (reason, count, last_at, last_detail) values "
                        "(?, ?, ?, ?) on conflict(reason) do update set count = count + "
                        "excluded.count, last_at = excluded.last_at, last_detail = "
                        "excluded.last_detail", [f"auth_{reason}", n, at, line[:500]])
        except Exception:  # noqa: BLE001 - a refusal is answered even if not counted
            logger.exception("could not count %d refused request(s)",
                             sum(v[0] for v in todo.values()))

    def close(self) -> None:
        self.flush()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _rows(self) -> list[dict[str, Any]]:
        from .db import _connect

        with self._reader_lock:
            if self._reader is None:
                self._reader = _connect(self.store.path)
            return list(self._reader.query(
                "select id, name, role, token_sha256, expires_at, revoked_at, last_used_at, "
                "created_at from operators"))

    # -- management ----------------------------------------------------------------
    def add(self, name: Any, role: Any, by: str | None, expires_in_s: Any = None,
            ) -> tuple[dict[str, Any], str]:
        """A new operator and its token (returned once, never stored): (row, token).
        A name may be given again once its previous operator is revoked."""
        check_name(name)
        check_role(role)
        if expires_in_s is not None and (
                isinstance(expires_in_s, bool) or not isinstance(expires_in_s, (int, float))
                or not 1 <= expires_in_s <= MAX_EXPIRY_S):
            raise BadRequest("bad_expiry", f"expires_in_s is 1..{MAX_EXPIRY_S} seconds "
                             "(or absent: never expires)")
        with self.store.write() as db:
            return self._add(db, name, role, by, expires_in_s)

    def _add(self, db: Any, name: str, role: str, by: str | None, expires_in_s: Any,
             ) -> tuple[dict[str, Any], str]:
        now = self.clock()
        if list(db.query("select 1 from operators where name = ? and revoked_at is null",
                         [name])):
            raise Conflict("operator_exists", f"operator {name!r} exists: revoke it first "
                           "to give the name a new token")
        token = new_token()
        row = {"name": name, "role": role, "token_sha256": hash_token(token),
               "created_at": now, "created_by": by, "last_used_at": None,
               "expires_at": now + expires_in_s if expires_in_s is not None else None,
               "revoked_at": None, "revoked_by": None}
        db["operators"].insert(row)
        self._audit(db, now, by, "operator_added", name,
                    {"role": role, "expires_at": row["expires_at"]})
        logger.info("operator %s (%s) added by %s", name, role, by or "?")
        return _public(row, now), token

    def list(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self.store.read() as db:
            rows = list(db.query("select * from operators order by name, id"))
        return [_public(r, now) for r in rows]

    def get(self, name: str) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from operators where name = ? order by "
                                 "revoked_at is null desc, id desc limit 1", [name]))
        if not rows:
            raise NotFound("unknown_operator", f"no operator {name!r}")
        return _public(rows[0], self.clock())

    def revoke(self, name: Any, by: str | None, allow_last_admin: bool = False,
               ) -> dict[str, Any]:
        """Revoke NAME's token (at once, on every worker: each request reads the
        table). The last active admin is kept unless ``allow_last_admin``."""
        check_name(name)
        now = self.clock()
        with self.store.write() as db:
            rows = list(db.query("select * from operators where name = ? and revoked_at "
                                 "is null", [name]))
            if not rows:
                old = list(db.query("select * from operators where name = ? order by id "
                                    "desc limit 1", [name]))
                if old:
                    return {**_public(old[0], now), "already": True}
                raise NotFound("unknown_operator", f"no operator {name!r}")
            r = rows[0]
            if r["role"] == "admin" and not allow_last_admin:
                admins = next(db.query(
                    "select count(*) as n from operators where role = 'admin' and revoked_at "
                    "is null and (expires_at is null or expires_at > ?)", [now]))["n"]
                if admins <= 1:
                    raise Conflict("last_admin", f"{name} is the last active admin: add "
                                   "another admin first (or, on the AppStore's machine, "
                                   "aidc store operator revoke --data-dir DIR --force)")
            db.execute("update operators set revoked_at = ?, revoked_by = ? where id = ?",
                       [now, by, r["id"]])
            self._audit(db, now, by, "operator_revoked", name, {"role": r["role"]})
            r.update(revoked_at=now, revoked_by=by)
        logger.info("operator %s revoked by %s", name, by or "?")
        return {**_public(r, now), "already": False}

    @staticmethod
    def _audit(db: Any, ts: float, actor: str | None, action: str, name: str,
               args: dict[str, Any]) -> None:
        import json

        db["audit_log"].insert({"ts": ts, "actor": actor, "action": action, "node_id": None,
                                "command_id": None, "op": name, "args": json.dumps(args),
                                "outcome": "done", "detail": ""})

    # -- first start -----------------------------------------------------------------
    def bootstrap(self, data_dir: Path) -> str | None:
        """With no operator at all: make ``admin`` and write its token to
        ``data_dir/admin.token`` (0600) before the transaction commits (a failed
        write makes nobody). Returns the token when it made one."""
        from cloud_sync.atomic import write_atomic

        path = Path(data_dir) / TOKEN_FILE
        with self.store.write() as db:
            if next(db.query("select count(*) as n from operators"))["n"]:
                return None
            _, token = self._add(db, BOOTSTRAP_NAME, "admin", "bootstrap", None)
            write_atomic(path, token + "\n", mode=0o600)
        logger.warning("first start: made the operator %r (role admin); its API token is in "
                       "%s (mode 0600). Use it with `aidc store ... --api-token-file %s` or "
                       "`Authorization: Bearer <token>`; add operators of your own with "
                       "`aidc store operator add`", BOOTSTRAP_NAME, path, path)
        return token

    # -- requests --------------------------------------------------------------------
    def authenticate(self, header: str | None) -> tuple[dict[str, Any] | None, str, str]:
        """``Authorization`` header -> (operator row, "", "") or (None, reason, detail).

        Every stored hash is compared with the presented one in constant time
        (no early exit: the table is small), so neither the token nor its hash
        leaks through timing."""
        if not header:
            return None, "no_token", "send Authorization: Bearer <token>"
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not _TOKEN_RE.match(token):
            return None, "malformed", "expected Authorization: Bearer <token>"
        presented = hash_token(token)
        found = None
        for r in self._rows():
            if hmac.compare_digest(r["token_sha256"], presented):
                found = r
        if found is None:
            return None, "bad_token", "unknown token"
        now = self.clock()
        if found["revoked_at"]:
            return None, "revoked", f"the token of {found['name']} was revoked"
        if found["expires_at"] is not None and found["expires_at"] <= now:
            return None, "expired", f"the token of {found['name']} expired"
        if found["last_used_at"] is None or now - found["last_used_at"] >= \
                LAST_USED_RESOLUTION_S:
            try:
                with self.store.write() as db:
                    db.execute("update operators set last_used_at = ? where id = ?",
                               [now, found["id"]])
            except Exception:  # noqa: BLE001 - bookkeeping must not refuse a request
                logger.exception("could not record last_used_at of %s", found["name"])
        return found, "", ""

    def refused(self, reason: str, detail: str, remote: str | None, method: str,
                path: str) -> None:
        """Count a refusal (``auth_<reason>`` in /stats) and log it (once per
        caller and reason every 10 s, so a scanner cannot flood the log).

        The count is written at most once a second per reason (a flood of
        refusals must not cost a synced write each); what is held meanwhile is
        written by :meth:`flush` (``GET /stats`` and shutdown call it)."""
        now = self.clock()
        line = f"{method} {path} from {remote or '?'}: {detail}"
        with self._count_lock:
            n, _, _ = self._pending.get(reason, (0, now, line))
            self._pending[reason] = (n + 1, now, line)
            due = now - self._flushed.get(reason, 0.0) >= COUNT_FLUSH_S
        if due:
            self.flush(reason)
        key = (remote or "?", reason)
        with self._log_lock:
            if now - self._logged.get(key, 0.0) < 10.0:
                return
            if len(self._logged) > 1024:
                self._logged.clear()
            self._logged[key] = now
        logger.warning("API request refused (%s): %s", reason, line)


def needed_role(endpoint: str | None, method: str) -> str | None:
    """The role a request needs: :data:`ROUTE_ROLES`, else viewer for reads and
    admin for writes (an unknown URL needs viewer: no route list for strangers)."""
    if endpoint in ROUTE_ROLES:
        return ROUTE_ROLES[endpoint]
    return "viewer" if method in ("GET", "HEAD", "OPTIONS") or endpoint is None else "admin"


def install(app: Any, operators: Operators | None, mode: str) -> None:
    """Check every request of ``app`` (Flask) before its handler runs.

    ``mode`` ``"token"``: as above; ``"off"``: nothing is checked and every
    request acts as an anonymous admin (the config allows it on loopback only).
    """
    from flask import g, jsonify, request

    @app.before_request
    def _authenticate() -> Any:
        g.operator = None
        need = needed_role(request.endpoint, request.method)
        if mode == "off" or need is None:
            return None
        assert operators is not None
        op, reason, detail = operators.authenticate(request.headers.get("Authorization"))
        if op is None:
            operators.refused(reason, detail, request.remote_addr, request.method,
                              request.path)
            resp = jsonify({"error": "unauthenticated", "detail": detail})
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = (
                'Bearer realm="aidc-store"' if reason == "no_token"
                else f'Bearer realm="aidc-store", error="invalid_token", '
                     f'error_description="{detail}"')
            return resp
        g.operator = op
        if RANK[op["role"]] < RANK[need]:
            operators.refused("forbidden", f"{op['name']} ({op['role']}) needs role {need}",
                              request.remote_addr, request.method, request.path)
            resp = jsonify({"error": "forbidden", "detail": f"needs role {need}"})
            resp.status_code = 403
            return resp
        return None


def current_operator() -> dict[str, Any] | None:
    from flask import g

    return getattr(g, "operator", None)


def actor(by: Any = None) -> str:
    """Who the audit log and the records name for this request: the
    authenticated operator; with ``api_auth = "off"``, ``anonymous``. A request's
    own ``by`` is never the actor (see :func:`by_note`)."""
    op = current_operator()
    return op["name"] if op else "anonymous"


def by_note(by: Any) -> str:
    """The request's ``by``, kept as a note when it says something else."""
    if isinstance(by, str) and by and by != actor():
        return f"by {by[:64]!r}"
    return ""


__all__ = ["ROLES", "ROUTE_ROLES", "Operators", "Unauthenticated", "Forbidden", "actor",
           "by_note", "current_operator", "hash_token", "install", "is_loopback",
           "local_actor", "needed_role", "new_token"]
