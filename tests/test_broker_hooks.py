"""Broker auth hooks for clustered brokers (appstore/broker_hooks.py), called as
EMQX 5 (HTTP authn/authz) and VerneMQ (webhooks) call them, and checked against
a real Mosquitto reading the ACL file the AppStore writes from the same rules."""

from __future__ import annotations

import queue
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask
from paho.mqtt.enums import CallbackAPIVersion

from appstore import broker_hooks
from appstore.config import load_config
from appstore.db import Store
from appstore.enrolment import Enrolment
from appstore.errors import ConfigError
from cloud_sync.topics import NODE_KINDS, Topics
from tests.brokers import Broker

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cret-" + "x" * 20
H = {broker_hooks.SECRET_HEADER: SECRET}
B = broker_hooks.PREFIX


class Fleet:
    """An AppStore's database with two enrolled nodes, the hooks on a Flask app."""

    def __init__(self, tmp: Path, hooks: bool = True, **over: Any) -> None:
        self.cfg = load_config(
            data_dir=str(tmp / "store"), topic_prefix=f"t{uuid.uuid4().hex[:8]}",
            mqtt_username="appstore", mqtt_password=secrets.token_hex(16), enrolment={},
            broker_hooks={"secret": SECRET} if hooks else None, **over)
        self.topics = Topics(prefix=self.cfg.topic_prefix)
        self.store = Store(self.cfg.db_path)
        self.enrolment = Enrolment(self.cfg, self.store)
        self.enrolment.sync()
        self.pw = {n: self.enrol(n) for n in ("node-a", "node-b")}
        self.app = Flask(__name__)
        self.auth = broker_hooks.register(self.app, self.cfg, self.store)
        self.c = self.app.test_client()

    def enrol(self, node_id: str) -> str:
        tok = self.enrolment.create_token(ttl_s=60)["token"]
        return self.enrolment.enrol(tok, node_id)["mqtt"]["password"]

    def post(self, path: str, body: Any, headers: dict | None = None, **kw: Any) -> Any:
        return self.c.post(B + path, json=body, headers=H if headers is None else headers, **kw)

    # the hooks' decisions, as each broker asks
    def emqx_authn(self, user: str, pw: str) -> str:
        r = self.post("/emqx/authn", {"clientid": f"c-{user}", "username": user,
                                      "password": pw})
        assert r.status_code == 200 and r.json["is_superuser"] is False, r.json
        return r.json["result"]

    def emqx_authz(self, user: str, action: str, topic: str) -> str:
        r = self.post("/emqx/authz", {"clientid": f"c-{user}", "username": user,
                                      "topic": topic, "action": action, "qos": 1})
        assert r.status_code == 200, r.json
        return r.json["result"]

    def verne(self, hook: str, body: dict) -> Any:
        r = self.c.post(f"{B}/vernemq/{hook}", json={"mountpoint": "", **body},
                        headers={**H, "vernemq-hook": hook})
        assert r.status_code == 200, r.json
        return r.json["result"]

    def verne_pub(self, user: str, topic: str) -> bool:
        res = self.verne("auth_on_publish", {"username": user, "client_id": f"c-{user}",
                                             "qos": 1, "topic": topic, "payload": "aGk=",
                                             "retain": False})
        return res == "ok"

    def verne_sub(self, user: str, topic: str) -> bool:
        res = self.verne("auth_on_subscribe", {"username": user, "client_id": f"c-{user}",
                                               "topics": [{"topic": topic, "qos": 1}]})
        return res == "ok"


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path)
    yield f
    f.store.close()


def test_connect_needs_the_right_password_of_an_enrolled_unrevoked_user(fleet: Fleet) -> None:
    """Authentication as EMQX (authn) and VerneMQ (auth_on_register) ask for it."""
    a, b = fleet.pw["node-a"], fleet.pw["node-b"]
    assert fleet.emqx_authn("node-a", a) == "allow"
    assert fleet.emqx_authn("node-a", b) == "deny"  # another node's password
    assert fleet.emqx_authn("node-a", a + "x") == "deny"
    assert fleet.emqx_authn("nobody", a) == "deny"
    assert fleet.emqx_authn("node-a", "") == "deny"
    assert fleet.emqx_authn("appstore", fleet.cfg.mqtt_password or "") == "allow"
    assert fleet.emqx_authn("appstore", a) == "deny"
    reg = {"peer_addr": "10.0.0.7", "peer_port": 50000, "client_id": "c1",
           "clean_session": True}
    assert fleet.verne("auth_on_register", {**reg, "username": "node-b", "password": b}) == "ok"
    assert fleet.verne("auth_on_register_m5", {**reg, "username": "node-b", "password": b,
                                               "properties": {}}) == "ok"
    assert fleet.verne("auth_on_register", {**reg, "username": "node-b", "password": a}) == \
        {"error": "not_allowed"}
    # a revoked node is refused at once, on every worker (the database says so)
    fleet.enrolment.revoke("node-b", by="test")
    assert fleet.emqx_authn("node-b", b) == "deny"
    assert fleet.verne("auth_on_register", {**reg, "username": "node-b", "password": b}) == \
        {"error": "not_allowed"}
    assert fleet.emqx_authz("node-b", "publish", fleet.topics.events("node-b")) == "deny"
    assert fleet.auth is not None and fleet.auth.stats["authn_deny"] >= 5


def test_a_node_may_use_its_own_topics_and_no_other_nodes(fleet: Fleet) -> None:
    t = fleet.topics
    z = fleet.emqx_authz
    assert z("node-a", "publish", t.feedback("node-a")) == "allow"
    assert z("node-a", "publish", t.feedback("node-b")) == "deny"
    assert z("node-a", "subscribe", t.desired("node-a")) == "allow"
    assert z("node-a", "subscribe", t.desired("node-b")) == "deny"
    assert z("node-a", "publish", t.desired("node-a")) == "deny"  # only the cloud says it
    assert z("node-a", "publish", t.commands("node-a")) == "deny"  # ... or sends commands
    assert z("node-a", "publish", t.results("node-a")) == "allow"
    assert z("node-a", "publish", t.stream_status("node-a", "cam-1")) == "allow"
    assert z("node-a", "publish", t.stream_status("node-b", "cam-1")) == "deny"
    assert z("node-a", "subscribe", t.all_nodes("state/desired")) == "deny"  # everyone's
    assert z("node-a", "subscribe", f"{t.root}/#") == "deny"
    assert z("node-a", "subscribe", f"{t.root}/nodes/node-a/#") == "deny"
    assert z("nobody", "publish", t.feedback("nobody")) == "deny"
    # the AppStore's own user: the whole root, shared subscriptions included, nothing else
    assert z("appstore", "subscribe", t.shared("appstore", t.all_nodes("feedback"))) == "allow"
    assert z("appstore", "publish", t.desired("node-a")) == "allow"
    assert z("appstore", "subscribe", f"{t.root}/#") == "allow"
    assert z("appstore", "publish", "elsewhere/topic") == "deny"
    assert z("appstore", "subscribe", "#") == "deny"
    # VerneMQ asks the same
    assert fleet.verne_pub("node-a", t.events("node-a"))
    assert not fleet.verne_pub("node-a", t.events("node-b"))
    assert fleet.verne_sub("node-a", t.ack("node-a"))
    assert not fleet.verne_sub("node-a", t.ack("node-b"))
    # a SUBSCRIBE with some filters denied: those get qos 128 (135 with MQTT 5), as
    # Mosquitto answers 0x80 for each denied filter
    mixed = [{"topic": t.ack("node-a"), "qos": 1}, {"topic": t.ack("node-b"), "qos": 1}]
    res = fleet.c.post(f"{B}/vernemq/auth_on_subscribe", headers=H, json={
        "username": "node-a", "client_id": "c", "mountpoint": "", "topics": mixed}).json
    assert res == {"result": "ok", "topics": [{"topic": t.ack("node-a"), "qos": 1},
                                              {"topic": t.ack("node-b"), "qos": 128}]}
    res = fleet.c.post(f"{B}/vernemq/auth_on_subscribe_m5", headers=H, json={
        "username": "node-a", "client_id": "c", "mountpoint": "", "topics": mixed,
        "properties": {}}).json
    assert res["modifiers"]["topics"][1] == {"topic": t.ack("node-b"), "qos": 135}


def test_the_secret_is_required_and_bad_bodies_are_400(fleet: Fleet) -> None:
    body = {"username": "node-a", "password": fleet.pw["node-a"]}
    for headers in ({}, {broker_hooks.SECRET_HEADER: "wrong-" + SECRET},
                    {broker_hooks.SECRET_HEADER: ""}):
        r = fleet.post("/emqx/authn", body, headers=headers)
        assert r.status_code == 401 and r.json["error"] == "unauthenticated", r.json
        r = fleet.post("/vernemq/auth_on_register", body, headers=headers)
        assert r.status_code == 401
    assert fleet.auth is not None and fleet.auth.stats["bad_secret"] == 6
    # VerneMQ sends no header of its own: the secret may come in the URL instead
    r = fleet.c.post(f"{B}/vernemq/auth_on_register?secret={SECRET}", json=body)
    assert r.status_code == 200 and r.json == {"result": "ok"}
    r = fleet.c.post(f"{B}/vernemq/auth_on_register?secret=nope", json=body)
    assert r.status_code == 401
    # malformed: not JSON, not an object, no topic, a strange action, no topics list
    for path, kw in (("/emqx/authn", {"data": b"{nope", "content_type": "application/json"}),
                     ("/emqx/authz", {"json": ["a", "list"]}),
                     ("/emqx/authz", {"json": {"username": "node-a", "action": "publish"}}),
                     ("/emqx/authz", {"json": {"username": "node-a", "action": "all",
                                               "topic": "x"}}),
                     ("/vernemq/auth_on_publish", {"json": {"username": "node-a",
                                                            "topic": 7}}),
                     ("/vernemq/auth_on_subscribe", {"json": {"username": "node-a"}}),
                     ("/vernemq/auth_on_subscribe", {"json": {"username": "node-a",
                                                              "topics": ["a/b"]}})):
        r = fleet.c.post(B + path, headers=H, **kw)
        assert r.status_code == 400, (path, r.status_code, r.data)
        assert r.is_json and r.json["error"] == "bad_request" and r.json["detail"]


def test_off_unless_configured_and_only_with_enrolment(tmp_path: Path) -> None:
    f = Fleet(tmp_path, hooks=False)
    assert f.auth is None
    r = f.post("/emqx/authn", {"username": "node-a", "password": f.pw["node-a"]})
    assert r.status_code == 404
    f.store.close()
    with pytest.raises(ConfigError, match="broker_hooks needs enrolment"):
        load_config(data_dir=str(tmp_path / "x"), broker_hooks={"secret": SECRET})
    with pytest.raises(ConfigError, match="secret"):
        load_config(data_dir=str(tmp_path / "x"), mqtt_username="a", mqtt_password="b",
                    enrolment={}, broker_hooks={"secret": "short"})


def test_the_appstore_serves_the_hooks_without_an_operator_token(
        tmp_path: Path, shared_broker: Any) -> None:
    """Registered where the AppStore builds its app; the broker has no operator
    token, only the shared secret."""
    from appstore.service import AppStoreService

    cfg = load_config(data_dir=str(tmp_path / "store"), mqtt_host=shared_broker.host,
                      mqtt_port=shared_broker.port, topic_prefix=f"t{uuid.uuid4().hex[:8]}",
                      http_port=0, mqtt_username="appstore", mqtt_password="pw-" + "y" * 20,
                      enrolment={}, broker_hooks={"secret": SECRET})
    svc = AppStoreService(cfg).start()
    try:
        c = svc.app.test_client()
        r = c.post(f"{B}/emqx/authn", headers=H, json={"username": "appstore",
                                                        "password": cfg.mqtt_password})
        assert r.status_code == 200 and r.json["result"] == "allow", r.json
        r = c.post(f"{B}/emqx/authz", headers=H, json={
            "username": "appstore", "action": "publish",
            "topic": Topics(prefix=cfg.topic_prefix).desired("n1")})
        assert r.status_code == 200 and r.json["result"] == "allow", r.json
        assert c.post(f"{B}/emqx/authn", json={}).status_code == 401
        # the rest of the API still wants an operator (api_auth = "token")
        assert c.get("/api/v1/nodes", headers=H).status_code == 401
        assert c.get("/api/v1/nodes", headers={
            "Authorization": f"Bearer {svc.admin_token}"}).status_code == 200
    finally:
        svc.stop()


# -- the same decisions as Mosquitto -------------------------------------------------------
def cases(t: Topics) -> list[tuple[str, str]]:
    """(action, topic) for node-a: every topic kind of its own and of node-b, both
    actions, and its streams' status; generated from the one topic list (NODE_KINDS)."""
    out = []
    for node in ("node-a", "node-b"):
        for kind in NODE_KINDS:
            for action in ("publish", "subscribe"):
                out.append((action, t.node(node, kind)))
        for action in ("publish", "subscribe"):
            out.append((action, t.stream_status(node, "cam-1")))
    return out


def wildcards(t: Topics) -> list[str]:
    return [*(t.all_nodes(kind) for kind in NODE_KINDS), f"{t.root}/nodes/node-a/#",
            f"{t.root}/#", f"{t.root}/nodes/node-a/+", f"{t.root}/nodes/node-a/state/+",
            f"{t.root}/nodes/node-a/streams/+/status"]


class Peer:
    """A bare paho client: what it receives, by topic."""

    def __init__(self, broker: Broker, user: str, pw: str) -> None:
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"p-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, pw)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        assert not self.connack.get(timeout=10).is_failure

    def sub(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.subacks.get(timeout=5)

    def pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, settle: float = 1.0) -> set[tuple[str, bytes]]:
        time.sleep(settle)
        out = set()
        while not self.got.empty():
            out.add(self.got.get_nowait())
        return out

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_hooks_decide_as_mosquitto_does_on_the_acl_file_written_from_the_same_rules(
        fleet: Fleet, tmp_path: Path) -> None:
    """A real Mosquitto on the password and ACL files the AppStore wrote: a node's
    publish is allowed where it reaches the AppStore, a subscription where what is
    published on the topic reaches the node (Mosquitto grants every SUBSCRIBE and
    checks each delivery; EMQX and VerneMQ check the SUBSCRIBE only, so the hooks
    answer for the topic what Mosquitto does for its messages)."""
    e, t = fleet.cfg.enrolment, fleet.topics
    assert e is not None and e.password_file and e.acl_file
    broker = Broker(tmp_path, auth=(e.password_file, e.acl_file)).start()
    peers: list[Peer] = []
    try:
        store = Peer(broker, "appstore", fleet.cfg.mqtt_password or "")
        node = Peer(broker, "node-a", fleet.pw["node-a"])
        peers += [store, node]
        store.sub(f"{t.root}/#")
        want = cases(t)
        subs = [topic for action, topic in want if action == "subscribe"]
        for topic in subs:
            node.sub(topic)
        sent = {("publish", topic): uuid.uuid4().hex.encode()
                for action, topic in want if action == "publish"}
        for (_, topic), payload in sent.items():
            node.pub(topic, payload)
        at_store = store.received()
        delivered = {("subscribe", topic): uuid.uuid4().hex.encode() for topic in subs}
        for (_, topic), payload in delivered.items():
            store.pub(topic, payload)
        at_node = node.received()
        mosquitto = {k: (k[1], p) in at_store for k, p in sent.items()}
        mosquitto.update({k: (k[1], p) in at_node for k, p in delivered.items()})

        hooks = {(a, x): fleet.emqx_authz("node-a", a, x) == "allow" for a, x in want}
        verne = {(a, x): (fleet.verne_pub if a == "publish" else fleet.verne_sub)("node-a", x)
                 for a, x in want}
        assert hooks == mosquitto, [(k, hooks[k], mosquitto[k]) for k in want
                                    if hooks[k] != mosquitto[k]]
        assert verne == mosquitto
        # not trivially so: the node's own upward kinds may be written, its downward
        # ones read, and nothing of node-b's either way
        for kind, (direction, _r, _q) in NODE_KINDS.items():
            own, other = t.node("node-a", kind), t.node("node-b", kind)
            assert mosquitto[("publish", own)] is (direction == "up"), kind
            assert mosquitto[("subscribe", own)] is (direction == "down"), kind
            assert not mosquitto[("publish", other)] and not mosquitto[("subscribe", other)]

        # wildcard filters: Mosquitto lets the node subscribe and delivers only what
        # it may read; the hooks refuse a filter wider than the node's read rules, so
        # on EMQX and VerneMQ it gets less, never more
        wild = Peer(broker, "node-a", fleet.pw["node-a"])
        peers.append(wild)
        for f in wildcards(t):
            wild.sub(f)
            assert fleet.emqx_authz("node-a", "subscribe", f) == "deny", f
            assert not fleet.verne_sub("node-a", f), f
        for topic in subs:
            store.pub(topic, b"w")
        got = {topic for topic, _ in wild.received()}
        assert got and got <= {x for (a, x), ok in hooks.items() if a == "subscribe" and ok}
    finally:
        for p in peers:
            p.stop()
        broker.stop()
