"""Node enrolment: one-time tokens, per-node broker credentials, revocation.

An operator creates a token (shown once, kept only as its sha256, expiring,
single use). A node presents it with the id it wants and gets back its MQTT
username (its node id) and a random password; the database and the broker's
password file keep only Mosquitto's PBKDF2 hash of it. Every change rewrites
the broker's password and ACL files from the database
(:mod:`appstore.mosquitto_auth`) inside the same transaction, so a failed write
leaves the token unused, and then tells the broker to reload.

Refusals (unknown, used, expired token; a node id already enrolled) raise the
:mod:`appstore.errors` class of their HTTP status with a stable reason, and are
counted in the ``rejections`` table (``enrol_<reason>``, shown by ``/stats``)
and logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from sqlite_utils import Database

from cloud_sync.topics import Topics

from . import broker_tls
from . import mosquitto_auth as auth
from .config import AppStoreConfig, EnrolmentConfig
from .db import Store
from .errors import AppStoreError, BadRequest, Conflict, Forbidden, Gone, NotFound
from .feedback import FeedbackStore
from .registry import check_node_id

logger = logging.getLogger(__name__)


class Unavailable(AppStoreError):
    """The AppStore cannot enrol anyone now (its own setup is wrong)."""

    status = 503
    default_reason = "unavailable"


LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _text(name: str, value: Any) -> str | None:
    """A free-text field someone typed (``by``, ``note``): a short string or None."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise BadRequest(f"bad_{name}", f"{name}: a string of at most 200 characters")
    return value


def _label(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not LABEL_RE.match(value):
        raise BadRequest(f"bad_{name}", f"{name} {value!r}: 1-64 of letters, digits, "
                         "'_', '-', '.'")
    return value


class Enrolment:
    """Tokens, enrolled nodes and the broker files, on the AppStore's database."""

    def __init__(self, cfg: AppStoreConfig, store: Store,
                 clock: Callable[[], float] = time.time,
                 on_revoked: Callable[[str], Any] | None = None) -> None:
        """``on_revoked(node_id)``: called after a revocation (the service
        publishes the node's retained availability as offline: the broker
        drops a revoked node's last will, which its ACL no longer allows)."""
        if cfg.enrolment is None:
            raise ValueError("enrolment is off in this AppStore's config")
        self.cfg = cfg
        self.e: EnrolmentConfig = cfg.enrolment
        self.store = store
        self.topics = Topics(prefix=cfg.topic_prefix)
        self.clock = clock
        self.on_revoked = on_revoked

    # -- operators ----------------------------------------------------------------
    def create_token(self, ttl_s: Any = None, by: str | None = None,
                     note: str | None = None) -> dict[str, Any]:
        """A new one-time token; the secret is in the answer and nowhere else."""
        ttl = self.e.default_token_ttl_s if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) \
                or not 1 <= ttl <= self.e.max_token_ttl_s:
            raise BadRequest("bad_ttl", f"ttl_s {ttl_s!r}: seconds from 1 to "
                             f"{self.e.max_token_ttl_s} (enrolment.max_token_ttl_s)")
        by, note = _text("by", by), _text("note", note)
        token = secrets.token_urlsafe(32)
        token_id = secrets.token_hex(6)
        now = self.clock()
        with self.store.write() as db:
            db["enrolment_tokens"].insert({
                "token_id": token_id, "token_sha256": _sha(token), "created_at": now,
                "expires_at": now + ttl, "created_by": by, "note": note})
        logger.info("enrolment token %s created by %s, expires %s", token_id, by or "?",
                    _iso(now + ttl))
        return {"token": token, "token_id": token_id, "expires_at": now + ttl,
                "expires": _iso(now + ttl), "ttl_s": ttl}

    def tokens(self) -> list[dict[str, Any]]:
        """Every token (never the secret), newest first, with its state."""
        now = self.clock()
        with self.store.read() as db:
            rows = list(db.query("select token_id, created_at, expires_at, created_by, note, "
                                 "used_at, used_by from enrolment_tokens "
                                 "order by created_at desc"))
        for r in rows:
            r["state"] = "used" if r["used_at"] else \
                ("expired" if now >= r["expires_at"] else "valid")
        return rows

    def nodes(self) -> list[dict[str, Any]]:
        """Every enrolled node (never a password hash)."""
        with self.store.read() as db:
            return list(db.query("select node_id, username, site, grp as 'group', token_id, "
                                 "enrolled_at, revoked_at, revoked_by from node_credentials "
                                 "order by node_id"))

    def revoke(self, node_id: str, by: str | None = None) -> dict[str, Any]:
        """Take the node's user out of the broker's files and reload it."""
        check_node_id(node_id)
        by = _text("by", by)
        now = self.clock()
        with self.store.write() as db:
            rows = list(db.query("select revoked_at from node_credentials where node_id = ?",
                                 [node_id]))
            if not rows:
                raise NotFound("not_enrolled", f"node {node_id!r} was never enrolled")
            already = rows[0]["revoked_at"] is not None
            if not already:
                db.execute("update node_credentials set revoked_at = ?, revoked_by = ? "
                           "where node_id = ?", [now, by, node_id])
                db.execute("update nodes set online = 0 where node_id = ?", [node_id])
            self._write_files(db)
        reloaded = self.reload()
        if self.on_revoked is not None and not already:
            self.on_revoked(node_id)
        logger.warning("node %s revoked by %s%s", node_id, by or "?",
                       " (it already was)" if already else "")
        return {"node_id": node_id, "revoked": True, "already": already,
                "broker_reloaded": reloaded}

    # -- nodes ------------------------------------------------------------------------
    def enrol(self, token: Any, node_id: Any, site: Any = None, group: Any = None,
              remote: str | None = None) -> dict[str, Any]:
        """Spend ``token`` on ``node_id``: its broker credentials, shown once."""
        try:
            return self._enrol(token, node_id, site, group)
        except AppStoreError as err:
            self._refused(err, node_id, remote)
            raise

    def _enrol(self, token: Any, node_id: Any, site: Any, group: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise BadRequest("bad_token", "token is required (a string)")
        if not isinstance(node_id, str):
            raise BadRequest("bad_node_id", "node_id is required (a string)")
        check_node_id(node_id)
        if node_id == self.cfg.mqtt_username:
            raise BadRequest("bad_node_id", f"{node_id!r} is the AppStore's own broker user")
        site, group = _label("site", site), _label("group", group)
        # the CA the node will trust, read before the token is spent
        ca_pem = self._broker_ca() if broker_tls.node_tls(self.cfg) else None
        password = secrets.token_urlsafe(32)
        now = self.clock()
        with self.store.write() as db:
            rows = list(db.query("select * from enrolment_tokens where token_sha256 = ?",
                                 [_sha(token)]))
            if not rows:
                raise Forbidden("unknown_token", "no such enrolment token")
            t = rows[0]
            if t["used_at"] is not None:
                raise Conflict("token_used", f"token {t['token_id']} was used at "
                               f"{_iso(t['used_at'])} (node {t['used_by']}); a token "
                               "enrols one node once")
            if now >= t["expires_at"]:
                raise Gone("token_expired", f"token {t['token_id']} expired at "
                           f"{_iso(t['expires_at'])}; ask for a new one")
            cur = list(db.query("select revoked_at from node_credentials where node_id = ?",
                                [node_id]))
            if cur and cur[0]["revoked_at"] is None:
                raise Conflict("already_enrolled", f"node {node_id!r} is enrolled; revoke it "
                               "first to enrol it again (the token is still unused)")
            db.execute("update enrolment_tokens set used_at = ?, used_by = ? "
                       "where token_id = ?", [now, node_id, t["token_id"]])
            db["node_credentials"].upsert({
                "node_id": node_id, "username": node_id,
                "password_hash": auth.hash_password(password), "site": site, "grp": group,
                "token_id": t["token_id"], "enrolled_at": now, "revoked_at": None,
                "revoked_by": None}, pk="node_id")
            db.execute("insert into nodes (node_id, online, desired_revision) values (?, 0, 0) "
                       "on conflict(node_id) do nothing", [node_id])
            # where it sits, for rollout targets (an operator may change it later)
            if site:
                db.execute("update nodes set site = ? where node_id = ?", [site, node_id])
            if group:
                db.execute("update nodes set grp = ? where node_id = ?", [group, node_id])
            self._write_files(db)
        reloaded = self.reload()
        logger.info("node %s enrolled with token %s (site %s, group %s)", node_id,
                    t["token_id"], site, group)
        url = urlsplit(self.e.broker_url)
        mqtt: dict[str, Any] = {
            "url": self.e.broker_url, "host": url.hostname,
            "port": url.port or (8883 if ca_pem else 1883), "username": node_id,
            "password": password, "topic_prefix": self.cfg.topic_prefix,
            # TLS: the node trusts this CA (PEM) for the broker's certificate
            "tls": ca_pem is not None}
        if ca_pem is not None:
            mqtt["ca_pem"] = ca_pem
        return {"node_id": node_id, "site": site, "group": group, "enrolled_at": now,
                "mqtt": mqtt, "broker_reloaded": reloaded}

    def _broker_ca(self) -> str:
        try:
            return broker_tls.broker_ca_pem(self.cfg)
        except AppStoreError as err:
            logger.error("enrolment cannot hand out the broker's CA: %s", err.detail)
            raise Unavailable("broker_ca_unavailable", err.detail) from err

    def _refused(self, err: AppStoreError, node_id: Any, remote: str | None) -> None:
        now = self.clock()
        detail = f"node {node_id!r} from {remote or '?'}: {err.detail}"
        with self.store.write() as db:
            FeedbackStore.record_rejection(db, f"enrol_{err.reason}", detail, now)
        logger.warning("enrolment refused (%s): %s", err.reason, detail)

    # -- the broker's files -------------------------------------------------------------
    def sync(self) -> bool:
        """Rewrite both files from the database and reload the broker (at start,
        and ``aidc store broker-files``); True when the broker was signalled."""
        with self.store.write() as db:
            self._write_files(db)
        return self.reload()

    def _write_files(self, db: Database) -> None:
        rows = list(db.query("select node_id, username, password_hash from node_credentials "
                             "where revoked_at is null order by node_id"))
        store_user = self.cfg.mqtt_username
        assert store_user and self.cfg.mqtt_password  # the config checked it
        users = [(store_user, auth.hash_password(self.cfg.mqtt_password))]
        users += [(r["username"], r["password_hash"]) for r in rows]
        assert self.e.password_file and self.e.acl_file
        acl = auth.render_acl(self.topics, store_user, [r["node_id"] for r in rows])
        auth.write_atomic(self.e.acl_file, acl, group=self.e.file_group)
        auth.write_atomic(self.e.password_file, auth.render_passwords(users),
                          group=self.e.file_group)

    def reload(self) -> bool:
        return auth.reload_broker(auth.broker_pid(self.e.broker_pid, self.e.broker_pid_file))
