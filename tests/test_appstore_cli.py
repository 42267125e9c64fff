"""``aidc store ...``: the commands a publisher and an operator type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appstore.cli import main
from tests.appstore_support import start_store

pytestmark = pytest.mark.timeout(60)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["store", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_publisher_workflow_from_sample_to_assignment(
        tmp_path: Path, shared_broker: Any, prefix: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """From nothing to an app assigned to a node with the CLI alone: make a key,
    build the sample, publish into the data dir, then operate the running store
    over its REST API."""
    data = tmp_path / "data"
    rc, out, _ = run(capsys, "keygen", "--data-dir", str(data))
    assert rc == 0 and (data / "keys" / "publisher.pem").exists()
    assert (data / "keys" / "publisher.pub").exists()
    key_id = out.split()[1]
    rc, out, _ = run(capsys, "keygen", "--data-dir", str(data))
    assert rc == 0 and "already" in out and key_id in out  # never silently replaced

    sample = tmp_path / "sample"
    assert run(capsys, "sample-digits", "--out", str(sample))[0] == 0
    rc, out, _ = run(capsys, "publish", "--model", str(sample / "model.onnx"),
                     "--manifest", str(sample / "manifest.json"),
                     "--labels", str(sample / "labels.txt"), "--data-dir", str(data))
    assert rc == 0 and out.startswith("published digits 1.0.0 sha256 ")

    svc = start_store(data, shared_broker, prefix)
    try:
        api = ["--api", svc.url, "--api-token-file", str(data / "admin.token")]
        rc, out, _ = run(capsys, "apps", *api)
        assert rc == 0 and "digits" in out and "classification" in out
        # publishing version 1.1.0 over REST with the same key
        manifest = json.loads((sample / "manifest.json").read_text())
        manifest["version"] = "1.1.0"
        (tmp_path / "m11.json").write_text(json.dumps(manifest))
        rc, out, _ = run(capsys, "publish", "--model", str(sample / "model.onnx"),
                         "--manifest", str(tmp_path / "m11.json"), "--data-dir", str(data), *api)
        assert rc == 0 and "published digits 1.1.0" in out
        apps = json.loads(run(capsys, "apps", "--json", *api)[1])
        assert [(a["name"], a["versions"]) for a in apps] == [("digits", ["1.1.0", "1.0.0"])]

        rc, out, _ = run(capsys, "assign", "edge-01", "digits", "1.1.0", *api)
        assert rc == 0 and "desired revision 1: digits 1.1.0" in out
        rc, out, _ = run(capsys, "nodes", *api)
        assert rc == 0 and "edge-01" in out and "offline" in out
        rc, out, _ = run(capsys, "feedback", "--app", "digits", *api)
        assert rc == 0 and out.strip() == "(none)"

        rc, _, err = run(capsys, "assign", "edge-01", "digits", "7.0.0", *api)
        assert rc == 1 and "unknown_version" in err and "7.0.0" in err
    finally:
        svc.stop()


def test_cli_errors_are_one_line_and_exit_non_zero(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Scripts can tell 'the store said no' from 'bad arguments' from 'store down'."""
    rc, _, err = run(capsys, "apps", "--api", "http://127.0.0.1:9")
    assert rc == 3 and err.startswith("error: unreachable")
    (tmp_path / "bad.json").write_text('{"data_dir": "/x", "mqtt_prot": 1}')
    rc, _, err = run(capsys, "keygen", "--config", str(tmp_path / "bad.json"))
    assert rc == 2 and "mqtt_prot = 1: Extra inputs are not permitted" in err
    (tmp_path / "model.onnx").write_bytes(b"junk")
    (tmp_path / "m.json").write_text('{"name": "x", "version": "1.0.0"}')
    rc, _, err = run(capsys, "publish", "--model", str(tmp_path / "model.onnx"), "--manifest",
                     str(tmp_path / "m.json"), "--data-dir", str(tmp_path / "d"))
    assert rc == 1 and err.startswith("error: bad_model")
    rc, _, err = run(capsys, "publish", "--model", "m", "--manifest", "j")
    assert rc == 2 and "nothing_to_do" in err
