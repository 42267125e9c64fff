"""TLS on the broker connection, on real parts: a Mosquitto with only a TLS
listener (certificates from ``aidc store broker-certs``, the password file and
ACL from enrolment), the AppStore service and a real edge agent enrolled with
``aidc edge enrol``, which hands the node the broker's CA."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import ssl
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from appstore import broker_tls
from appstore.broker_tls import BrokerCerts, ensure_broker_certs
from appstore.config import AppStoreConfig, load_config
from appstore.errors import ConfigError
from appstore.service import AppStoreService
from cloud_sync.connection import MqttConnection, Tls, TlsError
from edge_node.config import load_config as load_node_config
from edge_node.enrol import CA_FILE_NAME, merged_config
from edge_node.errors import ConfigError as NodeConfigError
from installer.cli import main
from tests.appstore_support import digits_dir, wait_until  # noqa: F401 - fixtures
from tests.brokers import Broker, free_port

pytestmark = pytest.mark.timeout(60)
API = "/api/v1"


def _san(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in ext.get_values_for_type(x509.IPAddress)]


def test_broker_certs_are_made_once_and_renewed_only_when_needed(tmp_path: Path) -> None:
    """A CA and a server certificate with the asked-for names, keys 0600; run again
    nothing changes; new names or a near expiry renew the server certificate under
    the same CA; a CA that cannot be used is an error, never replaced."""
    d = tmp_path / "tls"
    first = ensure_broker_certs(d, ["broker.example.org", "10.0.0.5"])
    assert first.ca_created and first.server == "created"
    for f, mode in ((first.ca_key, 0o600), (first.server_key, 0o600),
                    (first.ca_cert, 0o644), (first.server_cert, 0o644)):
        assert os.stat(f).st_mode & 0o777 == mode, f
    assert sorted(_san(first.server_cert)) == ["10.0.0.5", "broker.example.org"]
    ctx = ssl.create_default_context(cafile=first.ca_cert)  # a CA a client can load
    assert ctx.cert_store_stats()["x509_ca"] == 1
    ca, server = first.ca_cert.read_bytes(), first.server_cert.read_bytes()

    again = ensure_broker_certs(d, ["10.0.0.5", "broker.example.org"])
    assert (again.ca_created, again.server) == (False, "kept")
    assert (first.ca_cert.read_bytes(), first.server_cert.read_bytes()) == (ca, server)

    more = ensure_broker_certs(d, ["broker.example.org", "10.0.0.5", "10.0.0.6"])
    assert more.server == "renewed" and "names changed" in more.reason
    assert first.ca_cert.read_bytes() == ca
    assert "10.0.0.6" in _san(first.server_cert)
    x509.load_pem_x509_certificate(first.server_cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca))

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=810)
    near = ensure_broker_certs(d, ["broker.example.org", "10.0.0.5", "10.0.0.6"], now=later)
    assert near.server == "renewed" and "expires" in near.reason
    assert first.ca_cert.read_bytes() == ca

    with pytest.raises(ConfigError, match="neither a host name"):
        ensure_broker_certs(d, ["bad host!"])
    with pytest.raises(ConfigError, match="--host"):
        ensure_broker_certs(d, [])
    first.ca_key.write_bytes(ensure_broker_certs(tmp_path / "other", ["x"]).ca_key.read_bytes())
    with pytest.raises(ConfigError, match="is not the key of"):
        ensure_broker_certs(d, ["broker.example.org"])
    first.ca_cert.write_text("not a certificate")
    with pytest.raises(ConfigError, match="move .* away to make a new CA"):
        ensure_broker_certs(d, ["broker.example.org"])
    assert first.ca_cert.read_text() == "not a certificate"  # never replaced behind our back


def test_enrol_answers_old_and_new_merge_into_the_node_config(tmp_path: Path) -> None:
    """TLS in the answer turns the node's TLS on with the CA next to its config; an
    answer that says no TLS turns it off (and drops the certificate files); an
    answer from an AppStore before TLS leaves the node's own TLS settings alone."""
    conf = tmp_path / "node.json"
    mine = {"tls": True, "ca_file": "/etc/ssl/mine.pem", "keepalive": 60}
    conf.write_text(json.dumps({"node_id": "n1", "data_dir": str(tmp_path), "mqtt": mine}))
    base = {"host": "b", "port": 8883, "topic_prefix": "", "username": "n1", "password": "p"}
    old = merged_config(conf, {"node_id": "n1", "mqtt": base})
    assert {k: old["mqtt"][k] for k in mine} == mine
    new = merged_config(conf, {"node_id": "n1", "mqtt": {**base, "tls": True, "ca_pem": "x"}})
    assert new["mqtt"]["tls"] and new["mqtt"]["ca_file"] == str(tmp_path / CA_FILE_NAME)
    plain = merged_config(conf, {"node_id": "n1", "mqtt": {**base, "tls": False}})
    assert plain["mqtt"]["tls"] is False and "ca_file" not in plain["mqtt"]
    assert plain["mqtt"]["keepalive"] == 60


def test_tls_settings_that_cannot_work_fail_at_start_with_a_clear_error(
        tmp_path: Path) -> None:
    """A missing CA, a client key without its certificate, a CA file that is no
    certificate: an error naming the file, at once, not a connection that hangs."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsError, match=f"CA file {missing}: cannot be read"):
        MqttConnection("x", tls=Tls(ca_file=missing))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(TlsError, match="not a PEM certificate"):
        MqttConnection("x", tls=Tls(ca_file=junk))
    with pytest.raises(TlsError, match="needs its certificate"):
        Tls(key_file=junk).context()

    with pytest.raises(NodeConfigError, match=f"mqtt.tls: CA file {missing}"):
        load_node_config(None, node_id="n", data_dir=str(tmp_path),
                         mqtt={"tls": True, "ca_file": str(missing)})
    with pytest.raises(NodeConfigError, match="mqtt.tls is false"):
        load_node_config(None, node_id="n", data_dir=str(tmp_path),
                         mqtt={"ca_file": str(junk)})
    node_conf = tmp_path / "node.json"
    node_conf.write_text(json.dumps({"node_id": "n", "data_dir": str(tmp_path),
                                     "mqtt": {"tls": True, "ca_file": str(missing)}}))
    assert main(["edge", "run", "--config", str(node_conf)]) == 2

    cfg = load_config(data_dir=str(tmp_path / "store"), mqtt_tls=True, http_port=0)
    with pytest.raises(ConfigError, match="aidc store broker-certs"):
        AppStoreService(cfg).start()


@pytest.fixture
def tls_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An AppStore with enrolment on and TLS to a Mosquitto that has only a TLS
    listener, with the certificates `aidc store broker-certs` made and the files
    `aidc store broker-files` wrote."""
    port = free_port()
    conf = tmp_path / "appstore.json"
    conf.write_text(json.dumps({
        "data_dir": "store", "mqtt_port": port, "mqtt_tls": True,
        "topic_prefix": f"t{uuid.uuid4().hex[:8]}", "http_port": 0,
        "mqtt_username": "appstore", "mqtt_password": secrets.token_hex(16),
        "enrolment": {},
        # operator authentication is not what these tests are about
        **({"api_auth": "off"} if "api_auth" in AppStoreConfig.model_fields else {})}))
    assert main(["store", "broker-certs", "--config", str(conf), "--host", "127.0.0.1",
                 "--port", str(port)]) == 0
    out = capsys.readouterr().out
    assert f"listener {port}" in out and "tls_version tlsv1.2" in out
    assert main(["store", "broker-files", "--config", str(conf)]) == 0
    capsys.readouterr()
    cfg = load_config(conf)
    e = cfg.enrolment
    assert e is not None and e.password_file and e.acl_file
    assert e.broker_url == f"mqtts://127.0.0.1:{port}"
    certs = BrokerCerts(dir=broker_tls.tls_dir(cfg))
    broker = Broker(tmp_path, port=port, auth=(e.password_file, e.acl_file),
                    tls=certs).start()
    assert broker.proc is not None
    e.broker_pid = broker.proc.pid
    svc = AppStoreService(cfg).start()
    svc.broker = broker  # type: ignore[attr-defined]
    try:
        assert svc.wait_connected(10), f"the AppStore did not connect over TLS: " \
            f"{svc.conn.last_error}"
        yield svc
    finally:
        svc.stop()
        broker.stop()


def _token(svc: AppStoreService) -> str:
    r = svc.app.test_client().post(f"{API}/enrolment/tokens", json={"ttl_s": 600})
    assert r.status_code == 201, r.json
    return r.json["token"]


def test_enrolled_node_gets_the_ca_and_serves_over_tls(
        tls_store: AppStoreService, tmp_path: Path, digits_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`aidc edge enrol` writes the broker's CA next to the node's config (0644) and
    turns TLS on; the agent started from that config connects over TLS with its
    own credentials, reports its state, gets an app (desired state, package
    chunks) and serves it. Without the CA the AppStore refuses to enrol (503) and
    the token stays unspent."""
    from edge_node.agent import NodeAgent
    from tests.test_e2e import assign, http, node_app, publish

    svc = tls_store
    assert svc.conn.tls is not None and svc.conn.connected.is_set()
    ca = broker_tls.default_ca_file(svc.cfg)

    token = _token(svc)
    ca.rename(ca.with_suffix(".away"))
    r = svc.app.test_client().post(f"{API}/enrol", json={"token": token, "node_id": "site-1"})
    assert (r.status_code, r.json["error"]) == (503, "broker_ca_unavailable"), r.json
    assert "broker-certs" in r.json["detail"]
    ca.with_suffix(".away").rename(ca)

    keys = tmp_path / "edge" / "trusted_keys"
    keys.mkdir(parents=True)
    (keys / "store.pub").write_bytes(svc.key.public_pem())
    conf = tmp_path / "node" / "node.json"
    conf.parent.mkdir()
    conf.write_text(json.dumps({"node_id": "site-1", "data_dir": str(tmp_path / "edge"),
                                "http": {"port": 0}}))
    assert main(["edge", "enrol", "--store", svc.url, "--token", token,  # still unspent
                 "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "TLS" in out and CA_FILE_NAME in out
    node_ca = conf.parent / CA_FILE_NAME
    assert node_ca.read_bytes() == ca.read_bytes()
    assert os.stat(node_ca).st_mode & 0o777 == 0o644
    ncfg = load_node_config(conf)
    assert ncfg.mqtt.tls and ncfg.mqtt.ca_file == node_ca
    assert (ncfg.mqtt.host, ncfg.mqtt.port) == ("127.0.0.1", svc.broker.port)

    agent = NodeAgent(ncfg)
    agent.start()
    try:
        # the broker rereads its files a moment after the SIGHUP: the agent retries
        wait_until(lambda: agent.conn.connected.is_set(), timeout=15)
        assert agent.conn.tls is not None
        wait_until(lambda: svc.registry.get_node("site-1")["online"], timeout=10)
        wait_until(lambda: svc.registry.get_node("site-1").get("reported"), timeout=10)

        manifest = json.loads((digits_dir / "manifest.json").read_text())
        publish(svc, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                tmp_path / "d.aidc")
        assign(svc)
        wait_until(lambda: (node_app(svc) or {}).get("status") == "ready", timeout=30)
        import numpy as np

        from tests.models import digit_png
        x = np.load(digits_dir / "heldout.npz")["X_test"][0]
        status, body = http("POST", f"{agent.http_url}/v2/models/digits/classify",
                            digit_png(x), "image/png")
        assert status == 200, body
        assert agent.conn.stats.get("tls_failed", 0) == 0
    finally:
        agent.stop()


def test_a_client_trusting_another_ca_or_another_name_is_refused_clearly(
        tls_store: AppStoreService, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The broker's certificate is checked: a client with a different CA gets
    `certificate verify failed` (an ERROR in the log saying what it means), one
    that connects by a name the certificate does not hold gets a hostname
    mismatch; neither ever connects."""
    broker = tls_store.broker  # type: ignore[attr-defined]
    other = ensure_broker_certs(tmp_path / "other-ca", ["127.0.0.1"])
    caplog.set_level(logging.INFO, logger="cloud_sync.connection")
    wrong = MqttConnection("wrong-ca", broker.host, broker.port, tls=Tls(ca_file=other.ca_cert),
                           username="appstore", password=tls_store.cfg.mqtt_password)
    byname = MqttConnection("by-name", "localhost", broker.port, tls=broker.client_tls(),
                            username="appstore", password=tls_store.cfg.mqtt_password)
    for c in (wrong, byname):
        c.start()
    try:
        wait_until(lambda: wrong.stats["tls_failed"] and byname.stats["tls_failed"], timeout=10)
        assert not wrong.connected.is_set() and not byname.connected.is_set()
        assert "certificate verify failed" in (wrong.last_error or "")
        assert "not signed by the CA this client trusts" in (wrong.last_error or "")
        assert "does not name this host" in (byname.last_error or "")
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("wrong-ca" in m and "certificate verify failed" in m for m in errors)
    finally:
        for c in (wrong, byname):
            c.stop()
    # the same by hand with the standard library: the handshake itself fails
    ctx = ssl.create_default_context(cafile=other.ca_cert)
    with socket.create_connection((broker.host, broker.port), timeout=5) as s:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(s, server_hostname="127.0.0.1")


def test_plain_mqtt_cannot_talk_to_the_tls_port(tls_store: AppStoreService) -> None:
    """A client without TLS (right credentials and all) never gets a CONNACK: the
    broker reads its CONNECT as a broken TLS handshake and hangs up; the client
    says what that probably means."""
    broker = tls_store.broker  # type: ignore[attr-defined]
    plain = MqttConnection("plain", broker.host, broker.port, username="appstore",
                           password=tls_store.cfg.mqtt_password)
    plain.start()
    try:
        wait_until(lambda: plain.stats["closed_before_connack"], timeout=10)
        assert not plain.connected.is_set() and plain.stats["connects"] == 0
        assert "is this a TLS port" in (plain.last_error or "")
    finally:
        plain.stop()
    # raw bytes: an MQTT 3.1.1 CONNECT gets no CONNACK (0x20), only a hang-up or a TLS alert
    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])
    with socket.create_connection((broker.host, broker.port), timeout=5) as s:
        s.sendall(connect)
        try:
            answer = s.recv(16)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20"), answer


def test_mutual_tls_needs_a_certificate_of_the_ca(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """With `require_certificate true` a client without a certificate never gets a
    CONNACK (and is told a certificate may be what is missing); one with a client
    certificate from `aidc store broker-certs --client` connects."""
    conf = tmp_path / "appstore.json"
    conf.write_text(json.dumps({"data_dir": "store"}))
    assert main(["store", "broker-certs", "--config", str(conf), "--host", "127.0.0.1",
                 "--client", "site-1"]) == 0
    assert "client " in capsys.readouterr().out
    certs = BrokerCerts(dir=tmp_path / "store" / "broker" / "tls")
    cert, key = certs.dir / "clients" / "site-1.pem", certs.dir / "clients" / "site-1.key"
    assert os.stat(key).st_mode & 0o777 == 0o600
    broker = Broker(tmp_path, tls=certs, require_certificate=True).start()
    bare = MqttConnection("bare", broker.host, broker.port, tls=broker.client_tls())
    mine = MqttConnection("with-cert", broker.host, broker.port,
                          tls=Tls(ca_file=certs.ca_cert, cert_file=cert, key_file=key))
    try:
        for c in (bare, mine):
            c.start()
        assert mine.wait_connected(10), mine.last_error
        wait_until(lambda: bare.stats["connect_failed"] + bare.stats["connection_lost"],
                   timeout=10)
        assert not bare.connected.is_set() and bare.stats["connects"] == 0
        assert "certificate" in (bare.last_error or "").lower(), bare.last_error
    finally:
        for c in (bare, mine):
            c.stop()
        broker.stop()
