"""The REST API: publishing signed packages, the catalog, and clear 4xx errors."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from appstore.signing import SigningKey
from cloud_sync.package import read_package, write_package
from tests.appstore_support import (  # noqa: F401 - fixtures
    digits_dir,
    digits_package,
    start_store,
    store,
)

pytestmark = pytest.mark.timeout(60)
API = "/api/v1"


def upload(client: Any, data: bytes, multipart: bool = False) -> Any:
    if multipart:
        return client.post(f"{API}/packages", data={"file": (io.BytesIO(data), "p.zip")},
                           content_type="multipart/form-data")
    return client.post(f"{API}/packages", data=data, content_type="application/zip")


def test_publish_lists_in_catalog_and_downloads_verified(store: Any, digits_dir: Path,
                                                         tmp_path: Path) -> None:
    """What a publisher uploads is what the catalog shows and what a node
    downloads, byte for byte, verifiable with the store's published key."""
    c = store.app.test_client()
    sha, size = digits_package(digits_dir, store.key, tmp_path / "d1.zip")
    r = upload(c, (tmp_path / "d1.zip").read_bytes())
    assert r.status_code == 201, r.json
    assert r.json["sha256"] == sha and r.json["created"] is True
    digits_package(digits_dir, store.key, tmp_path / "d2.zip", version="1.10.0")
    assert upload(c, (tmp_path / "d2.zip").read_bytes(), multipart=True).status_code == 201

    [app] = c.get(f"{API}/apps").json["apps"]
    assert (app["name"], app["version"], app["versions"]) == ("digits", "1.10.0",
                                                             ["1.10.0", "1.0.0"])
    versions = c.get(f"{API}/apps/digits").json["versions"]
    assert [v["version"] for v in versions] == ["1.10.0", "1.0.0"]
    v1 = c.get(f"{API}/apps/digits/versions/1.0.0").json
    assert (v1["sha256"], v1["size"], v1["task"]) == (sha, size, "classification")
    assert v1["manifest"]["model"]["inputs"][0]["name"] == "input"

    body = c.get(f"{API}/packages/{sha}").data
    assert hashlib.sha256(body).hexdigest() == sha
    keys = {k: bytes.fromhex(v) for k, v in c.get(f"{API}/keys").json["keys"].items()}
    (tmp_path / "dl.zip").write_bytes(body)
    assert read_package(tmp_path / "dl.zip", keys, expected_sha256=sha).manifest.version == "1.0.0"


def _unsigned(digits: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", (digits / "manifest.json").read_text())
        zf.writestr("model.onnx", (digits / "model.onnx").read_bytes())
    return buf.getvalue()


def _tampered(good: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(good))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "labels.txt":
                data = data.replace(b"7", b"1")  # a '7' would now be reported as '1'
            zf.writestr(info.filename, data)
    return buf.getvalue()


def _lying_manifest(digits: Path, key: SigningKey, out: Path) -> bytes:
    """Correctly signed, but the manifest does not describe the model."""
    m = json.loads((digits / "manifest.json").read_text())
    m["model"]["inputs"][0]["shape"] = [None, 3, 224, 224]
    write_package(out, {"manifest.json": json.dumps(m).encode(),
                        "model.onnx": (digits / "model.onnx").read_bytes()}, key.sign, key.key_id)
    return out.read_bytes()


def test_bad_packages_get_a_4xx_with_a_clear_reason(store: Any, digits_dir: Path,
                                                    tmp_path: Path) -> None:
    """Nothing that could hurt a node gets into the catalog, and the publisher is
    told exactly why: corrupt, unsigned, untrusted signer, tampered after
    signing, or a manifest that does not match the model."""
    c = store.app.test_client()
    digits_package(digits_dir, store.key, tmp_path / "good.zip")
    good = (tmp_path / "good.zip").read_bytes()
    digits_package(digits_dir, SigningKey.generate(), tmp_path / "stranger.zip")
    cases = {
        "corrupt": b"PK\x03\x04 this is not really a zip",
        "unsigned": _unsigned(digits_dir),
        "untrusted_key": (tmp_path / "stranger.zip").read_bytes(),
        "bad_signature": _tampered(good),
        "tensor_mismatch": _lying_manifest(digits_dir, store.key, tmp_path / "lie.zip"),
    }
    for reason, data in cases.items():
        r = upload(c, data)
        assert (r.status_code, r.json["error"]) == (400, reason), (reason, r.json)
        assert r.json["detail"]
    assert "labels.txt changed after signing" in upload(c, cases["bad_signature"]).json["detail"]
    assert "rank 4 in manifest" in upload(c, cases["tensor_mismatch"]).json["detail"]
    r = c.post(f"{API}/packages", data={"other": "x"}, content_type="multipart/form-data")
    assert (r.status_code, r.json["error"]) == (400, "no_file")
    assert c.get(f"{API}/apps").json["apps"] == []


def test_a_version_is_immutable_but_republishing_the_same_bytes_is_fine(
        store: Any, digits_dir: Path, tmp_path: Path) -> None:
    """Nodes that installed digits 1.0.0 must never find different bytes under that
    name; an upload retried by a flaky CI job must not fail."""
    c = store.app.test_client()
    digits_package(digits_dir, store.key, tmp_path / "a.zip")
    digits_package(digits_dir, store.key, tmp_path / "b.zip", description="retrained")
    assert upload(c, (tmp_path / "a.zip").read_bytes()).status_code == 201
    again = upload(c, (tmp_path / "a.zip").read_bytes())
    assert again.status_code == 200 and again.json["created"] is False
    r = upload(c, (tmp_path / "b.zip").read_bytes())
    assert (r.status_code, r.json["error"]) == (409, "version_exists")
    assert "new version" in r.json["detail"]


def test_key_dropped_in_trusted_folder_is_accepted_without_restart(
        store: Any, digits_dir: Path, tmp_path: Path) -> None:
    """A second publishing team is onboarded by adding its public key file."""
    c = store.app.test_client()
    team = SigningKey.generate()
    digits_package(digits_dir, team, tmp_path / "t.zip")
    assert upload(c, (tmp_path / "t.zip").read_bytes()).json["error"] == "untrusted_key"
    store.cfg.trusted_dir.mkdir(parents=True, exist_ok=True)
    (store.cfg.trusted_dir / "team.pub").write_bytes(team.public_pem())
    r = upload(c, (tmp_path / "t.zip").read_bytes())
    assert r.status_code == 201 and r.json["key_id"] == team.key_id


def test_oversized_upload_is_413(tmp_path: Path, shared_broker: Any, prefix: str) -> None:
    """A huge upload is refused up front, as JSON, not by running out of disk."""
    svc = start_store(tmp_path / "s", shared_broker, prefix, max_upload_mb=1)
    try:
        r = upload(svc.app.test_client(), b"\0" * (2 << 20))
        assert (r.status_code, r.json["error"]) == (413, "too_large")
    finally:
        svc.stop()


def test_lookups_and_bad_input_are_json_4xx_never_500(store: Any) -> None:
    """Scripts and the fleet UI get a reason they can show for every mistake."""
    c = store.app.test_client()
    expect = [
        (c.get(f"{API}/apps/nope"), 404, "unknown_app"),
        (c.get(f"{API}/apps/nope/versions/1.0.0"), 404, "unknown_version"),
        (c.get(f"{API}/packages/{'0' * 64}"), 404, "unknown_package"),
        (c.get(f"{API}/packages/xyz"), 400, "bad_sha256"),
        (c.get(f"{API}/nodes/nobody"), 404, "unknown_node"),
        (c.get(f"{API}/nodes/bad%20id"), 400, "bad_node_id"),
        (c.put(f"{API}/nodes/n1/apps/digits", json={"version": "9.9.9"}), 404, "unknown_version"),
        (c.put(f"{API}/nodes/n1/apps/digits", data="{", content_type="application/json"),
         400, "bad_json"),
        (c.delete(f"{API}/nodes/n1/apps/digits"), 404, "not_assigned"),
        (c.get(f"{API}/feedback?limit=many"), 400, "bad_limit"),
        (c.get(f"{API}/feedback/abcdefgh/input"), 404, "unknown_sample"),
        (c.post(f"{API}/packages", data=b""), 400, "empty"),
        (c.get(f"{API}/no/such/thing"), 404, "not_found"),
        (c.delete(f"{API}/apps"), 405, "method_not_allowed"),
    ]
    for resp, status, reason in expect:
        assert (resp.status_code, resp.json["error"]) == (status, reason), resp.json
    assert c.get(f"{API}/health").json["mqtt_connected"] is True


def test_assign_with_a_resource_override_reaches_the_desired_state(
        tmp_path: Path, shared_broker: Any, prefix: str, digits_dir: Path) -> None:
    """An operator gives one site's copy of an app more of the card: the
    override travels in the node's desired state; a bad one is a 400 with why."""
    svc = start_store(tmp_path / "s", shared_broker, prefix)
    try:
        digits_package(digits_dir, svc.key, tmp_path / "d.aidc")
        c = svc.app.test_client()
        assert c.post(f"{API}/packages", data=(tmp_path / "d.aidc").read_bytes()).status_code == 201
        r = c.put(f"{API}/nodes/n1/apps/digits",
                  json={"version": "1.0.0", "resources": {"card_fraction": 1.0, "memory_mb": 256}})
        assert r.status_code == 200, r.json
        app = r.json["desired"]["apps"][0]
        assert app["resources"] == {"card_fraction": 1.0, "memory_mb": 256, "card": None}
        bad = c.put(f"{API}/nodes/n1/apps/digits",
                    json={"version": "1.0.0", "resources": {"card_fraction": 2}})
        assert bad.status_code == 400 and bad.json["error"] == "bad_resources"
        assert "card_fraction" in bad.json["detail"]
    finally:
        svc.stop()
