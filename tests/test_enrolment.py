"""Enrolment on a real Mosquitto that knows no anonymous clients: tokens, per-node
credentials and ACLs written by the AppStore, revocation after a broker reload."""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appstore import mosquitto_auth as auth
from appstore.config import load_config
from appstore.errors import ConfigError
from appstore.service import AppStoreService
from cloud_sync.topics import Topics
from edge_node.config import load_config as load_node_config
from installer.cli import main
from tests.appstore_support import (  # noqa: F401 - fixtures
    auth_headers, authorize, digits_dir, store, wait_until)
from tests.brokers import Broker, free_port

pytestmark = pytest.mark.timeout(90)
API = "/api/v1"
QUIET = 1.0  # how long a message that must not arrive is waited for


class Peer:
    """A bare paho client (v2 callback API): what it was told on CONNACK, and
    every message it receives."""

    def __init__(self, broker: Broker, username: str | None, password: str | None) -> None:
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"peer-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311)
        if username:
            self.c.username_pw_set(username, password)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.aside: list[tuple[str, bytes]] = []
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        self.rc = self.connack.get(timeout=10)

    @property
    def ok(self) -> bool:
        return not self.rc.is_failure

    def sub(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.subacks.get(timeout=5)

    def pub(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def expect(self, topic: str, payload: bytes, timeout: float = 5.0) -> None:
        """``payload`` arrives on ``topic`` (other messages before it are kept aside)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.got.get(timeout=left)
            except queue.Empty:
                break
            if msg == (topic, payload):
                return
            self.aside.append(msg)
        raise AssertionError(f"{payload!r} did not arrive on {topic}")

    def seen(self) -> list[tuple[str, bytes]]:
        """Every message not taken by :meth:`expect`."""
        out, self.aside = self.aside, []
        while True:
            try:
                out.append(self.got.get_nowait())
            except queue.Empty:
                return out


@pytest.fixture
def secured(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An AppStore with enrolment on, and a Mosquitto reading only the files it
    writes (``allow_anonymous false``, ``password_file``, ``acl_file``)."""
    port = free_port()
    conf = tmp_path / "appstore.json"
    conf.write_text(json.dumps({
        "data_dir": "store", "mqtt_port": port, "topic_prefix": f"t{uuid.uuid4().hex[:8]}",
        "http_port": 0, "mqtt_username": "appstore", "mqtt_password": secrets.token_hex(16),
        "enrolment": {}}))
    # the broker's files exist before its first start: `aidc store broker-files`
    assert main(["store", "broker-files", "--config", str(conf)]) == 0
    capsys.readouterr()
    cfg = load_config(conf)
    e = cfg.enrolment
    assert e is not None and e.password_file and e.acl_file
    broker = Broker(tmp_path, port=port, auth=(e.password_file, e.acl_file)).start()
    assert broker.proc is not None
    e.broker_pid = broker.proc.pid
    svc = AppStoreService(cfg).start()
    assert svc.wait_connected(10), "the AppStore could not log in to its own broker"
    authorize(svc)
    svc.broker = broker  # type: ignore[attr-defined]
    peers: list[Peer] = []
    svc.peer = lambda u, p: peers.append(Peer(broker, u, p)) or peers[-1]  # type: ignore

    def peer_ok(u: str, p: str) -> Peer:
        """A peer that must get in: the broker reloads on SIGHUP asynchronously, so a
        connect right after an enrolment may still meet the old files (a node's
        agent retries the same way)."""
        return wait_until(lambda: (c := svc.peer(u, p)).ok and c, timeout=5)
    svc.peer_ok = peer_ok  # type: ignore[attr-defined]
    yield svc
    for p in peers:
        p.stop()
    svc.stop()
    broker.stop()


def _token(svc: AppStoreService, ttl_s: int = 3600) -> str:
    r = svc.app.test_client().post(f"{API}/enrolment/tokens", json={"ttl_s": ttl_s, "by": "t"})
    assert r.status_code == 201, r.json
    return r.json["token"]


def _enrol(svc: AppStoreService, node_id: str, token: str | None = None) -> Any:
    return svc.app.test_client().post(f"{API}/enrol", json={
        "token": token or _token(svc), "node_id": node_id})


def test_enrolled_node_talks_on_its_own_topics_and_no_other(
        secured: AppStoreService, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The operator's token and `aidc edge enrol` give a node a config (0600) whose
    credentials let it publish its own topics and hear its own; a second enrolled
    node's messages on the first node's topics never arrive, and its subscription
    to them hears nothing; anonymous clients are refused."""
    svc, topics = secured, Topics(prefix=secured.cfg.topic_prefix)
    url = svc.url
    tok = ["--api-token-file", str(svc.cfg.admin_token_path)]
    assert main(["store", "token", "create", "--ttl", "1h", "--api", url, *tok]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    node_conf = tmp_path / "node" / "node.json"
    rc = main(["edge", "enrol", "--store", url, "--token", token, "--config", str(node_conf),
               "--node-id", "site-a", "--data-dir", str(tmp_path / "node"), "--site", "mine-1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "site-a enrolled" in out
    node_url = f"{url}/api/v1/nodes/site-a"
    node_row = json.loads(urllib.request.urlopen(urllib.request.Request(
        node_url, headers=auth_headers(node_url))).read())
    assert node_row["site"] == "mine-1"  # where it sits: a rollout target from now on
    assert os.stat(node_conf).st_mode & 0o777 == 0o600
    ncfg = load_node_config(node_conf)
    assert (ncfg.node_id, ncfg.mqtt.username, ncfg.mqtt.port) == \
        ("site-a", "site-a", svc.broker.port)
    assert ncfg.mqtt.topic_prefix == svc.cfg.topic_prefix
    pw_file = svc.cfg.enrolment.password_file.read_text()
    assert ncfg.mqtt.password not in pw_file and "site-a:$7$101$" in pw_file
    b = _enrol(svc, "site-b").json["mqtt"]

    watch = svc.peer("appstore", svc.cfg.mqtt_password)
    watch.sub(f"{topics.root}/#")
    a = svc.peer_ok(ncfg.mqtt.username, ncfg.mqtt.password)
    nb = svc.peer_ok(b["username"], b["password"])
    assert a.ok and nb.ok
    anon = svc.peer(None, None)
    assert not anon.ok and "authori" in str(anon.rc).lower()

    # its own upward topics reach the cloud; the AppStore sees it online
    a.pub(topics.events("site-a"), b"a-event")
    watch.expect(topics.events("site-a"), b"a-event")
    a.pub(topics.availability("site-a"),
          b'{"v": 1, "status": "online", "ts": %d, "agent_version": "t"}' % time.time())
    wait_until(lambda: svc.registry.get_node("site-a")["online"], timeout=5)
    # ... and it hears its own downward ones
    a.sub(topics.ack("site-a"))
    nb.sub(topics.ack("site-a"))  # the other node tries to listen in
    nb.sub(topics.desired("site-a"))
    watch.pub(topics.ack("site-a"), b"ack-for-a")
    a.expect(topics.ack("site-a"), b"ack-for-a")

    # site-b forges site-a's messages; site-a forges its own desired state
    nb.pub(topics.events("site-a"), b"forged-event")
    nb.pub(topics.availability("site-a"), b"forged-offline")
    a.pub(topics.desired("site-a"), b"self-desired")
    nb.pub(topics.events("site-b"), b"b-event")  # after the forgeries, in order
    watch.expect(topics.events("site-b"), b"b-event")
    time.sleep(QUIET)
    at_cloud = {p for _t, p in watch.seen()}
    assert not {b"forged-event", b"forged-offline", b"self-desired"} & at_cloud, at_cloud
    assert not nb.seen(), "site-b heard site-a's topics"
    assert svc.registry.get_node("site-a")["online"]


def test_bad_tokens_are_refused_with_a_reason_counted_and_logged(
        secured: AppStoreService, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A replayed token is 409 token_used, an expired one 410 token_expired, an
    unknown one 403; a node id already enrolled is 409 and leaves the token
    unspent; each refusal is in /stats and the log, and `aidc edge enrol` says it."""
    svc = secured
    c = svc.app.test_client()
    token = _token(svc)
    assert _enrol(svc, "site-a", token).status_code == 201
    caplog.set_level(logging.WARNING, logger="appstore.enrolment")

    r = _enrol(svc, "site-x", token)
    assert (r.status_code, r.json["error"]) == (409, "token_used")
    assert "site-a" in r.json["detail"]
    rc = main(["edge", "enrol", "--store", svc.url, "--token", token, "--config",
               str(tmp_path / "n.json"), "--node-id", "site-x", "--data-dir", str(tmp_path)])
    assert rc == 1 and "token_used" in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()

    late = _token(svc, ttl_s=60)
    svc.enrolment.clock = lambda: time.time() + 61
    r = _enrol(svc, "site-x", late)
    assert (r.status_code, r.json["error"]) == (410, "token_expired")
    svc.enrolment.clock = time.time

    r = _enrol(svc, "site-x", "not-a-token")
    assert (r.status_code, r.json["error"]) == (403, "unknown_token")
    spare = _token(svc)
    r = _enrol(svc, "site-a", spare)
    assert (r.status_code, r.json["error"]) == (409, "already_enrolled")
    assert _enrol(svc, "site-x", spare).status_code == 201  # not spent by the refusal
    r = c.post(f"{API}/enrol", json={"token": _token(svc), "node_id": "bad/id"})
    assert (r.status_code, r.json["error"]) == (400, "bad_node_id")
    r = c.post(f"{API}/enrolment/tokens", json={"ttl_s": 10 ** 9})
    assert (r.status_code, r.json["error"]) == (400, "bad_ttl")

    rej = c.get(f"{API}/stats").json["rejections"]
    assert {k: rej[k]["count"] for k in rej if k.startswith("enrol_")} == {
        "enrol_token_used": 2, "enrol_token_expired": 1, "enrol_unknown_token": 1,
        "enrol_already_enrolled": 1, "enrol_bad_node_id": 1}
    assert [r for r in caplog.records if "token_expired" in r.getMessage()]
    svc.enrolment.clock = lambda: time.time() + 61
    states = {t["state"] for t in c.get(f"{API}/enrolment/tokens").json["tokens"]}
    assert states == {"used", "expired", "valid"}
    assert all("token" not in t for t in c.get(f"{API}/enrolment/tokens").json["tokens"])


def test_revoked_node_cannot_connect_after_the_reload(
        secured: AppStoreService, capsys: pytest.CaptureFixture[str]) -> None:
    """`aidc store revoke` takes the node out of the broker's files and reloads it:
    the node's open connection is closed and it is refused on its next connect,
    while other nodes carry on; enrolled again, only the new password works."""
    svc, topics = secured, Topics(prefix=secured.cfg.topic_prefix)
    a = _enrol(svc, "site-a").json["mqtt"]
    b = _enrol(svc, "site-b").json["mqtt"]
    watch = svc.peer("appstore", svc.cfg.mqtt_password)
    watch.sub(f"{topics.root}/#")
    na, nb = svc.peer_ok(a["username"], a["password"]), svc.peer_ok(b["username"], b["password"])
    na.pub(topics.events("site-a"), b"before")
    watch.expect(topics.events("site-a"), b"before")

    assert main(["store", "revoke", "site-a", "--api", svc.url, "--api-token-file",
                 str(svc.cfg.admin_token_path)]) == 0
    assert "revoked; broker reloaded" in capsys.readouterr().out
    assert "site-a" not in svc.cfg.enrolment.password_file.read_text()

    def refused() -> bool:
        return not svc.peer(a["username"], a["password"]).ok
    wait_until(refused, timeout=5)
    # Mosquitto rechecks connected clients on reload: the open connection is closed
    # (and paho's own reconnects are refused)
    wait_until(lambda: not na.c.is_connected(), timeout=5)
    nb.pub(topics.events("site-b"), b"b-still-works")
    watch.expect(topics.events("site-b"), b"b-still-works")
    r = svc.app.test_client().post(f"{API}/nodes/site-a/revoke", json={})
    assert r.status_code == 200 and r.json["already"]
    r = svc.app.test_client().post(f"{API}/nodes/never/revoke", json={})
    assert (r.status_code, r.json["error"]) == (404, "not_enrolled")

    again = _enrol(svc, "site-a").json["mqtt"]
    assert svc.peer_ok(again["username"], again["password"]).ok
    assert not svc.peer(a["username"], a["password"]).ok


def test_enrolment_is_off_unless_configured(store: AppStoreService, tmp_path: Path) -> None:
    """Without an ``enrolment`` section the endpoints say so (the fleet keeps its
    shared broker login); with one, the AppStore's own broker user is required."""
    r = store.app.test_client().post(f"{API}/enrol", json={"token": "x", "node_id": "n"})
    assert (r.status_code, r.json["error"]) == (404, "enrolment_off")
    with pytest.raises(ConfigError, match="mqtt_username"):
        load_config(data_dir=str(tmp_path), enrolment={})


def test_password_hash_is_mosquittos_own_format(tmp_path: Path) -> None:
    """Our $7$ hashes and mosquitto_passwd's check the same way (the broker
    accepting ours is shown by the tests above)."""
    pw = tmp_path / "pw"
    pw.write_text("")
    if shutil.which("mosquitto_passwd"):
        subprocess.run(["mosquitto_passwd", "-b", str(pw), "u", "s3cret"], check=True)
        theirs = pw.read_text().strip().split(":", 1)[1]
        assert auth.verify_password("s3cret", theirs)
        assert not auth.verify_password("other", theirs)
    ours = auth.hash_password("s3cret")
    assert ours.startswith("$7$101$") and auth.verify_password("s3cret", ours)
    acl = auth.render_acl(Topics(prefix="p"), "appstore", ["n1"])
    assert "user n1\ntopic write p/aidc/v1/nodes/n1/availability" in acl
    assert "topic read p/aidc/v1/nodes/n1/state/desired" in acl
    # remote operations: the node only hears commands and only answers results
    assert "topic read p/aidc/v1/nodes/n1/commands\n" in acl
    assert "topic write p/aidc/v1/nodes/n1/results\n" in acl
    assert acl.index("user appstore") < acl.index("\ntopic ")  # no topic for anonymous


def test_edge_enrol_merges_into_the_config_and_checks_it_before_spending(
        secured: AppStoreService, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aidc edge enrol` keeps the rest of an existing config, and a config it could
    not write (TOML, or invalid once merged) is refused before the token is spent."""
    token = _token(svc := secured)
    conf = tmp_path / "node.json"
    conf.write_text(json.dumps({"node_id": "site-c", "data_dir": str(tmp_path / "d"),
                                "http": {"port": 9999}, "mqtt": {"keepalive": 60}}))
    conf.chmod(0o644)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"node_id": "site-c", "data_dir": "d", "nonsense": 1}))
    for target in (tmp_path / "node.toml", bad):
        rc = main(["edge", "enrol", "--store", svc.url, "--token", token, "--config", str(target)])
        assert rc == 2, capsys.readouterr()
    assert "nonsense" in capsys.readouterr().err
    assert main(["edge", "enrol", "--store", svc.url, "--token", token,
                 "--config", str(conf)]) == 0  # the same token: still unspent
    raw = json.loads(conf.read_text())
    assert raw["http"] == {"port": 9999} and raw["mqtt"]["keepalive"] == 60
    assert raw["mqtt"]["username"] == "site-c" and raw["mqtt"]["password"]
    assert raw["mqtt"]["tls"] is False  # a plain broker: the answer says so
    assert not (tmp_path / "broker-ca.pem").exists()
    assert os.stat(conf).st_mode & 0o777 == 0o600


def test_enrolled_agent_runs_the_whole_loop_on_the_locked_broker(
        secured: AppStoreService, tmp_path: Path, digits_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A real edge agent started from the config `aidc edge enrol` wrote gets the
    assigned app (desired state, package chunks), serves it, and its hard examples
    reach the AppStore and are acked -- every topic the agent uses is in its ACL;
    revoked, it goes offline for the AppStore (its last will)."""
    from edge_node.agent import NodeAgent
    from tests.test_e2e import assign, feedback, http, node_app, publish

    svc = secured
    keys = tmp_path / "edge" / "trusted_keys"
    keys.mkdir(parents=True)
    (keys / "store.pub").write_bytes(svc.key.public_pem())
    conf = tmp_path / "node.json"
    conf.write_text(json.dumps({"node_id": "site-1", "data_dir": str(tmp_path / "edge"),
                                "http": {"port": 0}, "feedback": {"threshold": 1.0}}))
    assert main(["edge", "enrol", "--store", svc.url, "--token", _token(svc),
                 "--config", str(conf)]) == 0, capsys.readouterr()
    agent = NodeAgent(load_node_config(conf))
    agent.start()
    try:
        manifest = json.loads((digits_dir / "manifest.json").read_text())
        publish(svc, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                tmp_path / "d.aidc")
        assign(svc)
        wait_until(lambda: (node_app(svc) or {}).get("status") == "ready", timeout=60)
        import numpy as np

        from tests.models import digit_png
        X = np.load(digits_dir / "heldout.npz")["X_test"]
        for x in X[:10]:
            status, body = http("POST", f"{agent.http_url}/v2/models/digits/classify",
                                digit_png(x), "image/png")
            assert status == 200, body
        kept = wait_until(lambda: agent.capture.stats.get("samples_kept", 0), timeout=10)
        wait_until(lambda: len(feedback(svc)) >= kept and agent.outbox.pending() == 0,
                   timeout=30)
        assert agent.conn.stats.get("subscribe_refused", 0) == 0

        # a remote operation on the locked broker: the command reaches the node on
        # its read-only `commands`, the result comes back on `results` and is acked
        r = svc.app.test_client().post(f"{API}/nodes/site-1/commands",
                                       json={"op": "selfcheck", "by": "ops"})
        assert r.status_code == 201, r.json
        done = wait_until(lambda: (c := svc.commands.get(r.json["command_id"]))["state"]
                          == "done" and c, timeout=30)
        assert done["result"]["ok"], done
        wait_until(lambda: agent.outbox.pending() == 0, timeout=30)
        # the node's own user cannot send the node a command (only the AppStore can)
        from cloud_sync.schemas import Command

        forged = Command(command_id="forged-0001", node_id="site-1", op="selfcheck",
                         expires_at=time.time() + 60)
        me = svc.peer_ok(agent.cfg.mqtt.username, agent.cfg.mqtt.password)
        me.pub(Topics(prefix=svc.cfg.topic_prefix).commands("site-1"), forged.to_bytes())
        me.stop()
        time.sleep(1.0)
        assert agent.remote.get("forged-0001") is None

        assert main(["store", "revoke", "site-1", "--api", svc.url, "--api-token-file",
                     str(svc.cfg.admin_token_path)]) == 0
        wait_until(lambda: not agent.conn.connected.is_set(), timeout=10)
        assert not svc.registry.get_node("site-1")["online"]
        watch = svc.peer("appstore", svc.cfg.mqtt_password)  # what a restarted store reads
        watch.sub(Topics(prefix=svc.cfg.topic_prefix).availability("site-1"))
        _topic, retained = watch.got.get(timeout=5)
        assert json.loads(retained)["status"] == "offline"
    finally:
        agent.stop()
