"""The edge<->cloud contract: topics, schemas, package format, docs."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync import schemas
from cloud_sync.errors import MessageRejected, PackageError
from cloud_sync.package import key_id, read_package, write_package
from cloud_sync.topics import NODE_KINDS, Topics

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = {
    "name": "toy", "version": "1.2.3", "task": "generic",
    "model": {"file": "model.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
              "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}]},
}


def _key():
    sk = Ed25519PrivateKey.generate()
    raw = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sk, raw, key_id(raw)


def _package(tmp_path: Path, sk, kid, manifest=MANIFEST, extra=None) -> Path:
    members = {"manifest.json": json.dumps(manifest).encode(), "model.onnx": b"\x08\x01fake"}
    members.update(extra or {})
    out = tmp_path / "p.aidc"
    write_package(out, members, sk.sign, kid)
    return out


def test_topics_round_trip_and_refuse_foreign_topics():
    """Every node topic parses back to (node, kind); anything else is a counted
    rejection, not a crash, so a stray publish cannot confuse a node."""
    t = Topics("acme")
    for kind in NODE_KINDS:
        assert t.parse(t.node("site-1", kind)) == ("site-1", kind)
    assert t.all_nodes("feedback") == "acme/aidc/v1/nodes/+/feedback"
    assert Topics.shared("g", "a/b") == "$share/g/a/b"
    for bad in ("aidc/v1/nodes/x/feedback", "acme/aidc/v1/nodes/x/nope", "acme/aidc/v1/other"):
        with pytest.raises(MessageRejected) as err:
            t.parse(bad)
        assert err.value.reason == "bad_topic"
    with pytest.raises(ValueError):
        t.feedback("bad/id")


@pytest.mark.parametrize("payload,reason", [
    (b"x" * (schemas.MAX_MESSAGE_BYTES + 1), "oversized"),
    (b"\xff\xfe not json", "not_json"),
    (b"[1,2]", "bad_schema"),
    (b'{"v": 2, "status": "online"}', "unsupported_version"),
    (b'{"v": 1, "status": "sleeping"}', "bad_schema"),
    (b'{"v": 1, "status": "online", "extra": 1}', "bad_schema"),
])
def test_malformed_messages_get_a_reason(payload, reason):
    """Each kind of bad message maps to a stable reason code (a counter label)."""
    with pytest.raises(MessageRejected) as err:
        schemas.parse(schemas.Availability, payload)
    assert err.value.reason == reason


def test_chunk_frames_round_trip_and_reject_garbage():
    """Blob chunks are binary frames; a truncated or foreign frame is refused."""
    h = schemas.ChunkHeader(sha256="ab" * 32, offset=10, size=100, length=3)
    frame = schemas.encode_chunk(h, b"xyz")
    assert schemas.decode_chunk(frame) == (h, b"xyz")
    for bad in (b"", b"NOPE\x00\x00\x00\x01{", frame[:-1]):
        with pytest.raises(MessageRejected):
            schemas.decode_chunk(bad)


def test_signed_package_verifies_and_is_deterministic(tmp_path):
    """A package signed by a trusted key opens; the same inputs give the same
    address, so the sha256 is a stable name for a version."""
    sk, raw, kid = _key()
    p = _package(tmp_path, sk, kid)
    pkg = read_package(p, {kid: raw})
    assert pkg.manifest.name == "toy" and pkg.model_bytes == b"\x08\x01fake"
    sha1 = pkg.sha256
    p2 = _package(tmp_path, sk, kid)
    assert read_package(p2, {kid: raw}).sha256 == sha1


def _rezip(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    for k, v in change.items():
        if v is None:
            members.pop(k, None)
        else:
            members[k] = v
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    dst.write_bytes(buf.getvalue())
    return dst


def test_untrusted_tampered_and_corrupt_packages_are_refused(tmp_path):
    """Every way a package can be bad has its own reason, so an operator sees why."""
    sk, raw, kid = _key()
    other_sk, other_raw, other_kid = _key()
    good = _package(tmp_path, sk, kid)
    cases = {
        "untrusted_key": (good, {other_kid: other_raw}, None),
        "hash_mismatch": (good, {kid: raw}, "0" * 64),
        "unsigned": (_rezip(good, tmp_path / "u.zip", {"signature.json": None}), {kid: raw}, None),
        "bad_signature": (_rezip(good, tmp_path / "t.zip", {"model.onnx": b"evil"}), {kid: raw}, None),
        "corrupt": (tmp_path / "junk.zip", {kid: raw}, None),
    }
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    for reason, (path, keys, sha) in cases.items():
        with pytest.raises(PackageError) as err:
            read_package(path, keys, expected_sha256=sha)
        assert err.value.reason == reason, (reason, err.value)
    # an added member after signing
    added = _rezip(good, tmp_path / "a.zip", {"extra.bin": b"x"})
    with pytest.raises(PackageError) as err:
        read_package(added, {kid: raw})
    assert err.value.reason == "corrupt"


def test_bad_manifest_is_refused_with_its_path(tmp_path):
    """A manifest that is not semver names the field, so a publisher can fix it."""
    sk, raw, kid = _key()
    p = _package(tmp_path, sk, kid, manifest={**MANIFEST, "version": "v1"})
    with pytest.raises(PackageError) as err:
        read_package(p, {kid: raw})
    assert err.value.reason == "bad_manifest" and "version" in str(err.value)


def test_every_topic_and_message_is_documented():
    """docs/protocol.md has a heading and an example for every topic kind."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    headings = set(re.findall(r"^## (.+)$", doc, re.M))
    documented = {k for h in headings for k in (s.strip() for s in h.split(" and "))}
    missing = [k for k in NODE_KINDS if k not in documented]
    assert not missing, f"undocumented topics: {missing}"


def _leaf_keys(model, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if hasattr(ann, "model_fields"):
            out += _leaf_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_config_key_is_documented():
    """docs/config.md (and docs/scheduling.md for ``scheduling.*``) list every key
    of both configs, so operators can find them."""
    from appstore.config import AppStoreConfig
    from edge_node.config import NodeConfig

    doc = (ROOT / "docs" / "config.md").read_text() + (ROOT / "docs" / "scheduling.md").read_text()
    missing = [k for k in _leaf_keys(NodeConfig) + _leaf_keys(AppStoreConfig)
               if f"`{k}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_cli_command_is_documented():
    """docs/cli.md shows every `aidc` subcommand."""
    import argparse

    from installer.cli import build_parser

    doc = (ROOT / "docs" / "cli.md").read_text()

    def commands(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, path + [name])
                return
        yield " ".join(path)

    missing = [c for c in commands(build_parser(), ["aidc"]) if f"`{c}" not in doc]
    assert not missing, f"undocumented commands: {missing}"
