"""Operator authentication of the AppStore REST API, on the real service: real
Flask app over HTTP, real SQLite, a real broker.

Roles (viewer < operator < admin), Bearer tokens kept as sha256 only, the
first start's admin token file, refusals counted and logged, the audit log's
actor, the CLI's token sources, and api_auth = "off" only on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appstore.cli import main as store_cli
from appstore.config import load_config
from appstore.errors import ConfigError
from appstore.publish import build_package
from appstore.service import AppStoreService
from tests.appstore_support import digits_dir, start_store  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120)
API = "/api/v1"


def call(svc: AppStoreService, method: str, path: str, token: str | None = None,
         body: Any = None, raw: bytes | None = None, header: str | None = None,
         ) -> tuple[int, Any, Any]:
    """(status, JSON body, headers) of a real HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    req = urllib.request.Request(f"{svc.url}{API}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json" if raw is None
                   else "application/octet-stream")
    if header is not None:
        req.add_header("Authorization", header)
    elif token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), err.headers


def add(svc: AppStoreService, admin: str, name: str, role: str, **extra: Any) -> str:
    status, out, _ = call(svc, "POST", "/operators", admin, {"name": name, "role": role,
                                                              **extra})
    assert status == 201, out
    assert out["name"] == name and out["role"] == role and out["state"] == "active"
    return out["token"]


def test_roles_tokens_and_refusals(tmp_path: Path, shared_broker: Any, prefix: str,
                                   digits_dir: Path) -> None:  # noqa: F811
    svc = start_store(tmp_path / "store", shared_broker, prefix)
    try:
        # first start: an admin, its token in a 0600 file, and it works
        tok_file = svc.cfg.data_dir / "admin.token"
        assert stat.S_IMODE(os.stat(tok_file).st_mode) == 0o600
        admin = tok_file.read_text().strip()
        assert admin.startswith("aidc_") and len(admin) >= 40
        status, me, _ = call(svc, "GET", "/whoami", admin)
        assert status == 200 and (me["name"], me["role"], me["auth"]) == \
            ("admin", "admin", "token")
        # only the sha256 is stored
        with svc.store.read() as db:
            rows = list(db.query("select name, token_sha256 from operators"))
        assert rows == [{"name": "admin",
                         "token_sha256": hashlib.sha256(admin.encode()).hexdigest()}]
        assert admin.encode() not in svc.cfg.db_path.read_bytes()

        # open routes: health, and enrol (its own one-time token; off here)
        assert call(svc, "GET", "/health")[0] == 200
        status, out, _ = call(svc, "POST", "/enrol", body={"token": "x", "node_id": "n"})
        assert (status, out["error"]) == (404, "enrolment_off")

        # no token, a wrong one, a malformed header: 401 with WWW-Authenticate
        status, out, headers = call(svc, "GET", "/nodes")
        assert (status, out["error"]) == (401, "unauthenticated")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, out, headers = call(svc, "GET", "/nodes", "aidc_" + "x" * 43)
        assert (status, out["error"], out["detail"]) == (401, "unauthenticated",
                                                         "unknown token")
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert call(svc, "GET", "/nodes", header=f"Basic {admin}")[0] == 401
        assert call(svc, "GET", "/nodes", header="Bearer a b c")[0] == 401
        assert call(svc, "GET", "/no/such/route")[0] == 401  # no route list for strangers
        assert call(svc, "POST", "/commands/x/bundle", admin)[0] == 405  # a JSON 4xx

        viewer = add(svc, admin, "view-1", "viewer")
        ops = add(svc, admin, "ops-1", "operator")

        # the admin publishes; nobody else may
        pkg = tmp_path / "d.aidc"
        manifest = json.loads((digits_dir / "manifest.json").read_text())
        build_package(digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
                      svc.key, pkg)
        for who in (viewer, ops):
            status, out, _ = call(svc, "POST", "/packages", who, raw=pkg.read_bytes())
            assert (status, out) == (403, {"error": "forbidden", "detail": "needs role admin"})
        assert call(svc, "POST", "/packages", admin, raw=pkg.read_bytes())[0] == 201

        # a viewer reads everything but changes nothing
        for path in ("/apps", "/nodes", "/rollouts", "/commands", "/audit", "/stats",
                     "/subscriptions", "/events"):
            assert call(svc, "GET", path, viewer)[0] == 200, path
        rollout = {"app": "digits", "version": "1.0.0", "target": {"nodes": ["n1"]},
                   "waves": {"canary": 1}, "by": "someone-else"}
        status, out, _ = call(svc, "POST", "/rollouts", viewer, rollout)
        assert (status, out) == (403, {"error": "forbidden", "detail": "needs role operator"})
        assert call(svc, "PUT", "/nodes/n1/labels", viewer, {"site": "a"})[0] == 403
        assert call(svc, "GET", "/operators", viewer)[0] == 403

        # an operator runs the fleet, but neither enrols nodes nor manages operators
        assert call(svc, "PUT", "/nodes/n1/labels", ops, {"site": "mine-1"})[0] == 200
        status, ro, _ = call(svc, "POST", "/rollouts", ops, rollout)
        assert status == 201 and ro["created_by"] == "ops-1", ro  # never the body's "by"
        status, ro, _ = call(svc, "POST", f"/rollouts/{ro['rollout_id']}/abort", ops,
                             {"by": "someone-else"})
        assert status == 200 and ro["reason"] == "aborted by ops-1", ro
        status, out, _ = call(svc, "POST", "/enrolment/tokens", ops, {"ttl_s": 60})
        assert (status, out["detail"]) == (403, "needs role admin")
        assert call(svc, "POST", "/operators", ops, {"name": "x", "role": "admin"})[0] == 403
        assert call(svc, "POST", "/nodes/n1/revoke", ops)[0] == 403

        # bad input to the operator routes: JSON 4xx, never a 500
        for body, want in (({"name": "bad name!", "role": "viewer"}, (400, "bad_name")),
                           ({"name": "x1", "role": "root"}, (400, "bad_role")),
                           ({"name": "x1", "role": "viewer", "expires_in_s": -5},
                            (400, "bad_expiry")),
                           ({"name": "ops-1", "role": "viewer"}, (409, "operator_exists")),
                           ([1, 2], (400, "bad_json"))):
            status, out, _ = call(svc, "POST", "/operators", admin, body)
            assert (status, out["error"]) == want, (body, out)
        assert call(svc, "POST", "/operators/nobody/revoke", admin)[1]["error"] == \
            "unknown_operator"
        status, out, _ = call(svc, "POST", "/operators/admin/revoke", admin)
        assert (status, out["error"]) == (409, "last_admin")

        # revoked: 401 at once; an expired token: 401
        status, out, _ = call(svc, "POST", "/operators/view-1/revoke", admin)
        assert status == 200 and out["state"] == "revoked" and out["revoked_by"] == "admin"
        assert call(svc, "POST", "/operators/view-1/revoke", admin)[1]["already"] is True
        status, out, _ = call(svc, "GET", "/nodes", viewer)
        assert status == 401 and "revoked" in out["detail"]
        brief = add(svc, admin, "brief", "viewer", expires_in_s=1)
        assert call(svc, "GET", "/nodes", brief)[0] == 200
        time.sleep(1.2)
        status, out, _ = call(svc, "GET", "/nodes", brief)
        assert status == 401 and "expired" in out["detail"]
        # the name may be given again once revoked, with a new token
        viewer2 = add(svc, admin, "view-1", "viewer")
        assert viewer2 != viewer and call(svc, "GET", "/nodes", viewer2)[0] == 200

        listed = {(o["name"], o["state"]) for o in call(svc, "GET", "/operators", admin)[1][
            "operators"]}
        assert {("admin", "active"), ("ops-1", "active"), ("view-1", "revoked"),
                ("view-1", "active"), ("brief", "expired")} <= listed
        used = next(o for o in call(svc, "GET", "/operators", admin)[1]["operators"]
                    if o["name"] == "ops-1")
        assert used["last_used_at"] and "token_sha256" not in used

        # every refusal is counted, with the caller's address
        rej = call(svc, "GET", "/stats", admin)[1]["rejections"]
        for reason in ("auth_no_token", "auth_bad_token", "auth_malformed", "auth_forbidden",
                       "auth_revoked", "auth_expired"):
            assert rej[reason]["count"] >= 1, (reason, rej)
        assert "127.0.0.1" in rej["auth_forbidden"]["last_detail"]
    finally:
        svc.stop()

    # a restart makes no second admin: the file and its token stay as they were
    svc = AppStoreService(svc.cfg).start()
    try:
        assert svc.bootstrap_token is None and tok_file.read_text().strip() == admin
        assert call(svc, "GET", "/whoami", admin)[1]["name"] == "admin"
    finally:
        svc.stop()


def test_audit_actor_is_the_operator(tmp_path: Path, shared_broker: Any,
                                     prefix: str) -> None:
    svc = start_store(tmp_path / "store", shared_broker, prefix)
    try:
        admin = svc.admin_token
        ops = add(svc, admin, "ops-1", "operator")
        assert call(svc, "PUT", "/nodes/n1/labels", ops, {"group": "g"})[0] == 200
        status, cmd, _ = call(svc, "POST", "/nodes/n1/commands", ops,
                              {"op": "selfcheck", "by": "the-boss"})
        assert status == 201 and cmd["created_by"] == "ops-1", cmd
        audit = call(svc, "GET", "/audit?node=n1", ops)[1]["audit"]
        assert [(a["actor"], a["action"]) for a in audit] == [("ops-1", "command_requested")]
        assert "by 'the-boss'" in audit[0]["detail"]  # the body's "by": a note only
        # operator management is in the audit log too
        every = call(svc, "GET", "/audit?by=admin", ops)[1]["audit"]
        assert [(a["action"], a["op"]) for a in every] == [("operator_added", "ops-1")]
        # a burst of refusals: written at most once a second, every one counted
        for _ in range(25):
            assert call(svc, "GET", "/apps")[0] == 401
        rej = call(svc, "GET", "/stats", ops)[1]["rejections"]
        assert rej["auth_no_token"]["count"] == 25, rej
    finally:
        svc.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = store_cli(["store", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_operators_local_and_through_the_api(
        tmp_path: Path, shared_broker: Any, prefix: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AIDC_STORE_TOKEN", raising=False)
    data = tmp_path / "store"
    # before the first start, on the data dir itself: the operator's own admin
    rc, out, err = run(capsys, "operator", "add", "root", "--role", "admin",
                       "--data-dir", str(data))
    assert rc == 0, err
    root = out.splitlines()[0]
    assert root.startswith("aidc_") and "not shown again" in out
    cfg = load_config(data_dir=str(data), mqtt_host=shared_broker.host,
                      mqtt_port=shared_broker.port, topic_prefix=prefix, http_port=0)
    svc = AppStoreService(cfg).start()
    try:
        assert svc.bootstrap_token is None and not (data / "admin.token").exists()
        api = ["--api", svc.url]
        # no token anywhere: a clear error, exit 1
        rc, _, err = run(capsys, "nodes", *api)
        assert rc == 1 and err.startswith("error: unauthenticated: ") and \
            "AIDC_STORE_TOKEN" in err and "--api-token-file" in err
        # the token from the environment
        monkeypatch.setenv("AIDC_STORE_TOKEN", root)
        rc, out, _ = run(capsys, "whoami", *api)
        assert rc == 0 and out.startswith("root") and "admin" in out
        rc, out, err = run(capsys, "operator", "add", "looker", "--role", "viewer",
                           "--expires", "30d", *api)
        assert rc == 0, err
        looker = out.splitlines()[0]
        rc, out, _ = run(capsys, "operator", "list", *api)
        assert rc == 0 and "looker" in out and "viewer" in out and "expires" in out
        # a viewer's token in a file: reads work, writes are refused with the reason
        tok = tmp_path / "looker.token"
        tok.write_text(looker + "\n")
        rc, out, _ = run(capsys, "nodes", *api, "--api-token-file", str(tok))
        assert rc == 0
        rc, _, err = run(capsys, "label", "n1", "--site", "x", *api, "--api-token-file",
                         str(tok))
        assert rc == 1 and "forbidden: needs role operator" in err and str(tok) in err
        rc, out, _ = run(capsys, "operator", "revoke", "looker", *api)
        assert rc == 0 and "revoked" in out
        rc, _, err = run(capsys, "nodes", *api, "--api-token-file", str(tok))
        assert rc == 1 and "revoked" in err
        rc, out, _ = run(capsys, "audit", *api)
        assert rc == 0 and "root operator_added looker" in out
        # locally again (the server running or not): list, and the last admin guard
        monkeypatch.delenv("AIDC_STORE_TOKEN")
        rc, out, _ = run(capsys, "operator", "list", "--data-dir", str(data), "--json")
        assert {(o["name"], o["state"]) for o in json.loads(out)} == \
            {("root", "active"), ("looker", "revoked")}
        rc, _, err = run(capsys, "operator", "revoke", "root", "--data-dir", str(data))
        assert rc == 1 and "last_admin" in err
        # revoked on the database by another process: the running server refuses it
        _, temp = svc.operators.add("temp", "viewer", "tests")
        assert call(svc, "GET", "/nodes", temp)[0] == 200
        rc, _, err = run(capsys, "operator", "revoke", "temp", "--data-dir", str(data))
        assert rc == 0, err
        assert call(svc, "GET", "/nodes", temp)[0] == 401
        rc, _, err = run(capsys, "operator", "add", "Bad Name", "--role", "viewer",
                         "--data-dir", str(data))
        assert rc == 1 and "bad_name" in err
        rc, _, err = run(capsys, "nodes", *api, "--api-token-file", str(tmp_path / "none"))
        assert rc == 2 and "no_token" in err
    finally:
        svc.stop()


def test_bootstrap_token_file_used_by_the_cli(tmp_path: Path, shared_broker: Any,
                                              prefix: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--data-dir on an API command reads DATA_DIR/admin.token."""
    monkeypatch.delenv("AIDC_STORE_TOKEN", raising=False)
    svc = start_store(tmp_path / "store", shared_broker, prefix)
    try:
        rc, out, err = run(capsys, "whoami", "--api", svc.url, "--data-dir",
                           str(svc.cfg.data_dir))
        assert rc == 0 and out.startswith("admin"), err
    finally:
        svc.stop()


def test_auth_off_only_on_loopback(tmp_path: Path, shared_broker: Any, prefix: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="api_auth = 'off'.*open to the network"):
        load_config(data_dir=str(tmp_path), api_auth="off", http_host="0.0.0.0")
    conf = tmp_path / "store.json"
    conf.write_text(json.dumps({"data_dir": "d", "api_auth": "off",
                                "http_host": "192.168.1.10"}))
    rc, _, err = run(capsys, "serve", "--config", str(conf))
    assert rc == 2 and "api_auth" in err and "192.168.1.10" in err
    # a config copied past validation is refused by the service itself
    cfg = load_config(data_dir=str(tmp_path / "x"), api_auth="off")
    with pytest.raises(ConfigError, match="open to the network"):
        AppStoreService(cfg.model_copy(update={"http_host": "0.0.0.0"})).start()
    # on loopback it is allowed: nothing is checked, no admin is made
    svc = start_store(tmp_path / "open", shared_broker, prefix, api_auth="off")
    try:
        status, me, _ = call(svc, "GET", "/whoami")
        assert status == 200 and me == {"name": None, "role": "admin", "auth": "off"}
        assert call(svc, "GET", "/nodes")[0] == 200
        assert not (svc.cfg.data_dir / "admin.token").exists()
    finally:
        svc.stop()
