"""Auth hooks for clustered brokers (EMQX, VerneMQ): the Mosquitto rules over HTTP.

With enrolment on, the AppStore writes Mosquitto's password and ACL files
(:mod:`appstore.mosquitto_auth`). A clustered broker reads no such files: it
asks an HTTP service on every connect (authentication) and on every publish
and subscribe (authorisation). These endpoints answer from the same database
and the same rules, so a node may do on EMQX or VerneMQ exactly what it may do
on Mosquitto:

- **who**: the AppStore's own user (``mqtt_username`` / ``mqtt_password``) and
  every enrolled node that is not revoked, its password checked against the
  stored ``$7$`` PBKDF2 hash (the one in Mosquitto's password file);
- **what**: :func:`appstore.mosquitto_auth.node_rules` for a node (its upward
  topics write, its downward ones read), :func:`~appstore.mosquitto_auth.store_rules`
  for the AppStore (the whole root), decided by
  :func:`~appstore.mosquitto_auth.allowed` with Mosquitto's matching.

Endpoints (``POST``, JSON in and out), under ``/api/v1/broker``:

- ``/emqx/authn`` ``{"username", "password", "clientid"}`` -> ``{"result":
  "allow" | "deny", "is_superuser": false}`` (EMQX 5 HTTP authentication);
- ``/emqx/authz`` ``{"username", "topic", "action": "publish" | "subscribe"}``
  -> ``{"result": "allow" | "deny"}`` (EMQX 5 HTTP authorisation);
- ``/vernemq/auth_on_register[_m5]`` ``{"username", "password", "client_id",
  ...}``, ``/vernemq/auth_on_publish[_m5]`` ``{"username", "topic", ...}``,
  ``/vernemq/auth_on_subscribe[_m5]`` ``{"username", "topics": [{"topic",
  "qos"}]}`` -> ``{"result": "ok"}`` or ``{"result": {"error":
  "not_allowed"}}`` (VerneMQ webhooks); a subscription with some topics
  denied is answered ``ok`` with those topics' ``qos`` 128 (135 for MQTT 5), as
  Mosquitto answers 0x80 for each denied filter of a SUBSCRIBE.

Off unless ``broker_hooks`` is configured. Every call must carry the shared
secret ``broker_hooks.secret``, in the ``X-Aidc-Broker-Secret`` header (EMQX:
the authenticator's ``headers``) or, for brokers that send no header of their
own (VerneMQ's webhooks), a ``secret`` query parameter: otherwise ``401``. The
hooks need no operator token (the broker has none). A body that is not the
JSON the broker sends is ``400`` with the reason.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections import Counter
from typing import Any

from cloud_sync.topics import Topics

from . import mosquitto_auth as auth
from .config import AppStoreConfig
from .db import Store

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Aidc-Broker-Secret"
PREFIX = "/api/v1/broker"
#: VerneMQ's qos for a denied topic of a SUBSCRIBE (MQTT 3.1.1, MQTT 5 "not authorized")
DENIED_QOS, DENIED_QOS_M5 = 128, 135


class BadHookRequest(ValueError):
    """The broker's request is not what the hook expects (answered 400)."""


class BrokerAuth:
    """Who may connect, and what each user may publish and subscribe."""

    def __init__(self, cfg: AppStoreConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.topics = Topics(prefix=cfg.topic_prefix)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _node(self, username: str) -> dict[str, Any] | None:
        """The enrolled, unrevoked node whose broker user this is."""
        with self.store.read() as db:
            rows = list(db.query("select node_id, password_hash from node_credentials where "
                                 "username = ? and revoked_at is null", [username]))
        return rows[0] if rows else None

    def authenticate(self, username: Any, password: Any) -> bool:
        """The broker user and password are right (the AppStore's own, or an
        enrolled node's that is not revoked)."""
        ok = False
        if isinstance(username, str) and isinstance(password, str) and username and password:
            if username == self.cfg.mqtt_username:
                ok = hmac.compare_digest(password.encode(),
                                         (self.cfg.mqtt_password or "").encode())
            else:
                node = self._node(username)
                ok = node is not None and auth.verify_password(password, node["password_hash"])
        self._count("authn_allow" if ok else "authn_deny")
        if not ok:
            logger.warning("broker hook: refused a connect as %r", username)
        return ok

    def rules(self, username: Any) -> list[auth.Rule]:
        """The user's rules; none for an unknown or revoked user."""
        if not isinstance(username, str) or not username:
            return []
        if username == self.cfg.mqtt_username:
            return auth.store_rules(self.topics)
        node = self._node(username)
        return auth.node_rules(self.topics, node["node_id"]) if node else []

    def authorize(self, username: Any, action: str, topic: Any) -> bool:
        if not isinstance(topic, str):
            raise BadHookRequest("topic is required (a string)")
        ok = auth.allowed(self.rules(username), action, topic)
        self._count(f"{action}_{'allow' if ok else 'deny'}")
        if not ok:
            logger.info("broker hook: %r may not %s %r", username, action, topic)
        return ok


def _body() -> dict[str, Any]:
    from flask import request

    body = request.get_json(force=True, silent=True)  # whatever content type it names
    if not isinstance(body, dict):
        raise BadHookRequest("the body must be a JSON object (the broker's hook request)")
    return body


def make_blueprint(broker_auth: BrokerAuth, secret: str) -> Any:
    """The hooks' endpoints under ``/api/v1/broker``, each checking ``secret``."""
    from flask import Blueprint, jsonify, request

    bp = Blueprint("broker_hooks", __name__, url_prefix=PREFIX)

    def _error(status: int, reason: str, detail: str) -> Any:
        resp = jsonify({"error": reason, "detail": detail})
        resp.status_code = status
        return resp

    @bp.before_request
    def _check_secret() -> Any:
        given = request.headers.get(SECRET_HEADER) or request.args.get("secret") or ""
        if not hmac.compare_digest(given.encode(), secret.encode()):
            broker_auth._count("bad_secret")  # noqa: SLF001
            logger.warning("broker hook %s from %s: %s secret", request.path,
                           request.remote_addr, "wrong" if given else "no")
            return _error(401, "unauthenticated", f"send the broker hooks' secret in the "
                          f"{SECRET_HEADER} header")
        return None

    @bp.errorhandler(BadHookRequest)
    def _bad(err: BadHookRequest) -> Any:
        return _error(400, "bad_request", str(err))

    # -- EMQX 5 -------------------------------------------------------------------------
    @bp.post("/emqx/authn")
    def emqx_authn() -> Any:
        b = _body()
        ok = broker_auth.authenticate(b.get("username"), b.get("password"))
        return jsonify({"result": "allow" if ok else "deny", "is_superuser": False})

    @bp.post("/emqx/authz")
    def emqx_authz() -> Any:
        b = _body()
        action = b.get("action")
        if action not in ("publish", "subscribe"):
            raise BadHookRequest(f"action {action!r}: publish or subscribe")
        ok = broker_auth.authorize(b.get("username"), action, b.get("topic"))
        return jsonify({"result": "allow" if ok else "deny"})

    # -- VerneMQ webhooks --------------------------------------------------------------
    def _verne(ok: bool) -> Any:
        return jsonify({"result": "ok"} if ok else {"result": {"error": "not_allowed"}})

    @bp.post("/vernemq/auth_on_register")
    @bp.post("/vernemq/auth_on_register_m5")
    def vernemq_register() -> Any:
        b = _body()
        return _verne(broker_auth.authenticate(b.get("username"), b.get("password")))

    @bp.post("/vernemq/auth_on_publish")
    @bp.post("/vernemq/auth_on_publish_m5")
    def vernemq_publish() -> Any:
        b = _body()
        return _verne(broker_auth.authorize(b.get("username"), "publish", b.get("topic")))

    @bp.post("/vernemq/auth_on_subscribe")
    @bp.post("/vernemq/auth_on_subscribe_m5")
    def vernemq_subscribe() -> Any:
        b = _body()
        topics = b.get("topics")
        if not isinstance(topics, list) or not topics or not all(
                isinstance(t, dict) and isinstance(t.get("topic"), str) for t in topics):
            raise BadHookRequest('topics: a list of {"topic": ..., "qos": ...}')
        user = b.get("username")
        verdicts = [broker_auth.authorize(user, "subscribe", t["topic"]) for t in topics]
        if all(verdicts):
            return _verne(True)
        if not any(verdicts):
            return _verne(False)
        denied = DENIED_QOS_M5 if request.path.endswith("_m5") else DENIED_QOS
        out = [{"topic": t["topic"], "qos": t.get("qos", 0) if ok else denied}
               for t, ok in zip(topics, verdicts)]
        if request.path.endswith("_m5"):
            return jsonify({"result": "ok", "modifiers": {"topics": out}})
        return jsonify({"result": "ok", "topics": out})

    return bp


def register(app: Any, cfg: AppStoreConfig, store: Store) -> BrokerAuth | None:
    """Add the hooks to the AppStore's Flask ``app`` when ``broker_hooks`` is
    configured (None otherwise). They are open to the broker without an operator
    token: the shared secret authenticates it."""
    if cfg.broker_hooks is None:
        return None
    broker_auth = BrokerAuth(cfg, store)
    bp = make_blueprint(broker_auth, cfg.broker_hooks.secret)
    app.register_blueprint(bp)
    try:  # the REST API's operator check (appstore/auth.py): open to the broker
        from .auth import ROUTE_ROLES
    except ImportError:
        pass
    else:
        for rule in app.url_map.iter_rules():
            if rule.endpoint.startswith(f"{bp.name}."):
                ROUTE_ROLES.setdefault(rule.endpoint, None)
    logger.info("broker auth hooks on at %s (EMQX authn/authz, VerneMQ webhooks)", PREFIX)
    return broker_auth
