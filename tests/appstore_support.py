"""Helpers for the AppStore tests: the digits sample, a running AppStore on a
real broker, and a fake edge node speaking the real MQTT contract."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appstore.config import load_config
from appstore.publish import build_package
from appstore.samples.digits import build_digits_sample
from appstore.service import AppStoreService
from appstore.signing import SigningKey
from cloud_sync.connection import MqttConnection
from cloud_sync.schemas import BlobRequest
from cloud_sync.topics import Topics


def wait_until(fn: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll ``fn`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits sample (model.onnx, manifest.json, labels.txt, heldout.npz), built once."""
    return build_digits_sample(tmp_path_factory.mktemp("digits"))


def digits_package(digits: Path, key: SigningKey, out: Path,
                   **manifest_changes: Any) -> tuple[str, int]:
    manifest = json.loads((digits / "manifest.json").read_text())
    manifest.update(manifest_changes)
    return build_package(digits / "model.onnx", manifest, digits / "labels.txt", key, out)


#: base URL of each AppStore the tests started -> its admin token; the tests'
#: HTTP helper (tests.test_e2e.http) sends it to URLs under that base
STORE_TOKENS: dict[str, str] = {}


def authorize(svc: AppStoreService, token: str | None = None) -> str:
    """Let the tests' callers of ``svc`` act as its bootstrap admin (or ``token``):
    ``svc.app.test_client()`` and :func:`auth_headers` send the token."""
    from flask.testing import FlaskClient

    token = token or svc.admin_token
    assert token, f"no admin token in {svc.cfg.admin_token_path}"
    STORE_TOKENS[svc.url] = token

    class _Client(FlaskClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"

    svc.app.test_client_class = _Client
    return token


def auth_headers(url: str) -> dict[str, str]:
    """The Authorization header for ``url`` when it is one of our AppStores'."""
    for base, token in STORE_TOKENS.items():
        if url.startswith(base + "/"):
            return {"Authorization": f"Bearer {token}"}
    return {}


def operator_token_file(svc: AppStoreService, name: str, role: str, folder: Path) -> Path:
    """A new operator NAME with ROLE on ``svc``; its token in ``folder/<name>.token``
    (for the CLI's ``--api-token-file``)."""
    assert svc.operators is not None
    _, token = svc.operators.add(name, role, "tests")
    path = Path(folder) / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def start_store(data_dir: Path, broker: Any, prefix: str, **overrides: Any) -> AppStoreService:
    cfg = load_config(data_dir=str(data_dir), mqtt_host=broker.host, mqtt_port=broker.port,
                      topic_prefix=prefix, http_port=0, **overrides)
    if getattr(broker, "kind", "mosquitto") == "embedded":  # amqtt has no $share
        cfg = cfg.model_copy(update={"shared_group": None})
    svc = AppStoreService(cfg).start()
    if cfg.api_auth == "token":
        authorize(svc)
    assert svc.wait_connected(10), "the AppStore did not connect to the broker"
    _wait_subscribed(broker, prefix)
    return svc


def _wait_subscribed(broker: Any, prefix: str, timeout: float = 10.0) -> None:
    """``connected`` is set when the SUBSCRIBEs are sent, not acknowledged: wait
    until the store answers a blob request (its last subscription; the broker
    handles one client's SUBSCRIBEs in order, so all others are active too)."""
    topics = Topics(prefix=prefix)
    node_id = f"probe-{uuid.uuid4().hex[:6]}"
    got: queue.Queue[bytes] = queue.Queue()
    conn = MqttConnection(f"probe-{node_id}", broker.host, broker.port)
    conn.subscribe(topics.blob_chunk(node_id), lambda t, p, r: got.put(p))
    conn.start()
    try:
        assert conn.wait_connected(timeout)
        req = BlobRequest(sha256="0" * 64, offset=0, length=1024, chunk_size=1024).to_bytes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn.publish(topics.blob_request(node_id), req, qos=1)
            try:
                got.get(timeout=0.2)
                return
            except queue.Empty:
                continue
        raise AssertionError("the AppStore's subscriptions did not become active")
    finally:
        conn.stop()


@pytest.fixture
def store(tmp_path: Path, shared_broker: Any, prefix: str):
    """A running AppStore on the shared broker under this test's topic prefix."""
    svc = start_store(tmp_path / "store", shared_broker, prefix)
    yield svc
    svc.stop()


class FakeNode:
    """An edge node as the AppStore sees it: a real MQTT client on the node's topics.

    Every message on the node's ``ack`` and ``state/desired`` topics lands in a queue.
    """

    def __init__(self, broker: Any, prefix: str, node_id: str | None = None) -> None:
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:6]}"
        self.topics = Topics(prefix=prefix)
        self.conn = MqttConnection(f"fake-{self.node_id}-{uuid.uuid4().hex[:4]}",
                                   broker.host, broker.port)
        self.acks: queue.Queue[bytes] = queue.Queue()
        self.desired: queue.Queue[tuple[bytes, bool]] = queue.Queue()
        self.conn.subscribe(self.topics.ack(self.node_id), lambda t, p, r: self.acks.put(p))
        self.conn.subscribe(self.topics.desired(self.node_id),
                            lambda t, p, r: self.desired.put((p, r)))

    def start(self) -> "FakeNode":
        self.conn.start()
        assert self.conn.wait_connected(10)
        return self

    def stop(self) -> None:
        self.conn.stop()

    def publish(self, kind: str, payload: bytes | str, retain: bool = False) -> None:
        assert self.conn.publish(self.topics.node(self.node_id, kind), payload, qos=1,
                                 retain=retain)

    def next(self, q: queue.Queue, timeout: float = 5.0) -> Any:
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived within {timeout}s") from None
