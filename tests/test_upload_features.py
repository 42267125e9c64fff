"""Upload level ``features`` (data residency): the input stays home, the head's
features travel, and the cloud retrains the head from them.

Real parts: Mosquitto, the AppStore, an edge agent with worker processes, the
features helper process with ONNX Runtime, SQLite on disk, the retrain as a
child process. Features are checked against what ORT computes here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

from cloud_sync import schemas
from edge_node.capture import Capture
from edge_node.config import FeedbackConfig
from edge_node.learning import FeatureExtractor, find_app_head
from tests.appstore_support import (FakeNode, digits_dir, store, wait_until)  # noqa: F401
from tests.test_cloud_retrain import _accuracy, _site
from tests.test_e2e import API, feedback, http, jget, loop, node_app, publish  # noqa: F401
from tests.test_hard_examples import _all_samples, _classify, _serve_digits, _settle
from tests.test_site_learning import blur


def test_the_stricter_level_wins_and_features_sit_between_metadata_and_full():
    def level(site: str, cloud: str | None, app_site: str | None = None) -> str:
        apps = {"digits": {"upload": app_site}} if app_site else {}
        c = Capture(None, None, "t", Path("/nonexistent"),
                    FeedbackConfig(upload=site, apps=apps))
        if cloud:
            c.cloud_upload = {"digits": cloud}
        return c.upload_level("digits")

    assert level("full", "features") == "features"
    assert level("features", "full") == "features"
    assert level("features", "metadata") == "metadata"
    assert level("metadata", "features") == "metadata"
    assert level("full", None, app_site="features") == "features"
    assert level("features", "none") == "none"
    with pytest.raises(Exception, match="'features'"):
        FeedbackConfig(upload="embeddings")
    with pytest.raises(Exception):
        schemas.AppRef(name="d", version="1", sha256="0" * 64, size=1, upload="embeddings")
    from appstore.cli import main as store_cli

    with pytest.raises(SystemExit):
        store_cli(["assign", "site-1", "digits", "1.0.0", "--upload", "embeddings"])


def _outbox_feedback(agent) -> list[dict]:
    db = sqlite3.connect(str(agent.cfg.data_dir / "node.db"))
    try:
        rows = db.execute("select payload from cloud_sync_outbox where kind = 'feedback'")
        return [json.loads(r[0]) for r in rows]
    finally:
        db.close()


def test_a_features_site_sends_the_heads_features_and_never_the_input(
        loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path, upload="features",
                          feedback={"threshold": 1.0, "max_per_minute": 100000})
    wait_until(lambda: (node_app(store) or {}).get("upload") == "features", timeout=15)
    status, body = http("PUT", f"{store.url}{API}/nodes/site-1/apps/digits",
                        {"version": "1.0.0", "upload": "embeddings"})
    assert status == 400 and json.loads(body)["error"] == "bad_upload"
    assert "none, metadata, features, full" in json.loads(body)["detail"]
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:12])
    _settle(agent, 12)
    kept = agent.capture.stats["samples_kept"]
    assert kept >= 10
    rows = wait_until(lambda: (r := feedback(store)) and len(r) >= kept and r, timeout=30)
    assert {r["shared"] for r in rows} == {"features"}
    assert {r["input_type"] for r in rows} == {"none"}
    assert all(r["input_sha256"] is None for r in rows)
    wait_until(lambda: agent.capture.stats["samples_shared_features"] == kept, timeout=10)
    # the messages that left held no input bytes
    msgs = _outbox_feedback(agent)
    assert len(msgs) == kept
    assert all(m["sample"]["input_b64"] == "" and m["sample"]["input_type"] == "none"
               for m in msgs)
    assert http("GET", f"{store.url}{rows[0]['input_url']}")[0] == 404

    # ... and their features are what ONNX Runtime computes here from the site's input
    head, model_path, manifest = find_app_head(digits_dir)
    fx = FeatureExtractor(model_path, head)
    model_sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    from cloud_sync.manifest import load_manifest
    from edge_node.worker.preprocess import image_to_tensor

    m = load_manifest(manifest)
    local = {s["sample_id"]: s for s in _all_samples(agent)}
    for r in rows:
        got = jget(f"{store.url}{r['features_url']}")
        assert (got["tensor"], got["n"], got["head"]) == (head.feature, head.n_features,
                                                          head.node)
        assert (got["model_version"], got["model_sha256"]) == ("1.0.0", model_sha)
        png = http("GET", f"{agent.http_url}{local[r['sample_id']]['input_url']}")[1]
        want = fx(image_to_tensor(png, m.preprocess, m.model.inputs[0]))[0]
        np.testing.assert_array_equal(np.asarray(got["values"], np.float32), want)
    # the cloud's per-site view says what the site shares
    ds = jget(f"{store.url}{API}/apps/digits/dataset")
    assert ds["sites"]["site-1"]["shared_features"] == len(rows)
    assert ds["features_only"] == len(rows) and ds["metadata_only"] == 0
    wait_until(lambda: agent.telemetry.message().apps["digits"].shared_features == kept,
               timeout=10)


def test_a_model_with_no_head_falls_back_to_metadata_counted_and_logged(
        loop, digits_dir, tmp_path, caplog):  # noqa: F811
    """The manifest pins the head on the wrong node (NotFineTunable): each sample
    travels as metadata, counted, with the reason logged once."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000, "upload": "features"})
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["learning"]["head"] = "MatMul"
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    status, body = http("PUT", f"{store.url}{API}/nodes/site-1/apps/digits",
                        {"version": "1.0.0", "upload": "full"})
    assert status == 200, body
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)
    assert node_app(store)["upload"] == "features"  # the site's own policy is stricter
    caplog.set_level(logging.WARNING, logger="edge_node.capture")
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:8])
    _settle(agent, 8)
    kept = agent.capture.stats["samples_kept"]
    rows = wait_until(lambda: (r := feedback(store)) and len(r) >= kept and r, timeout=30)
    assert {r["shared"] for r in rows} == {"metadata"}
    st = agent.capture.stats
    assert st["samples_features_fallback"] == kept
    assert st["samples_features_fallback_not_fine_tunable"] == kept
    assert st["samples_shared_metadata"] == kept and st["samples_shared_features"] == 0
    why = [r.getMessage() for r in caplog.records if "no features" in r.getMessage()]
    assert len(why) == 1 and "not_fine_tunable" in why[0] and "MatMul" in why[0], why
    assert agent.capture.features.stats["requests"] == 1  # the verdict is kept per version


def _features_msg(sample_id: str, values: bytes, n: int) -> bytes:
    s = {"sample_id": sample_id, "app": "digits", "version": "1.0.0", "created_at": 1.0,
         "reason": "confidence<0.6", "input_type": "none", "input_b64": "",
         "prediction": {"label": "3", "index": 3, "score": 0.4}, "scores": [],
         "shared": "features",
         "features": {"tensor": "next_activations", "head": "MatMul1", "n": n,
                      "b64": base64.b64encode(values).decode(), "model_version": "1.0.0",
                      "model_sha256": "ab" * 32}}
    return json.dumps({"v": 1, "msg_id": sample_id, "sample": s}).encode()


def test_the_appstore_refuses_features_of_the_wrong_length_or_not_finite(
        store, shared_broker, prefix, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="appstore.fleet")
    node = FakeNode(shared_broker, prefix).start()
    try:
        good = np.linspace(-1, 1, 32).astype("<f4")
        nan = good.copy()
        nan[5] = np.nan
        cases = {uuid.uuid4().hex: (good.tobytes(), 32, True),
                 uuid.uuid4().hex: (good[:31].tobytes(), 32, False),
                 uuid.uuid4().hex: (nan.tobytes(), 32, False),
                 uuid.uuid4().hex: (np.full(32, np.inf, "<f4").tobytes(), 32, False)}
        for sid, (raw, n, _) in cases.items():
            node.publish("feedback", _features_msg(sid, raw, n))
        acks: dict[str, dict] = {}
        while len(acks) < len(cases):
            for a in json.loads(node.next(node.acks, timeout=10))["acks"]:
                acks[a["msg_id"]] = a
        for sid, (_, _, ok) in cases.items():
            assert acks[sid]["ok"] is ok, acks[sid]
            if not ok:
                assert acks[sid]["reason"] == "bad_features"
        rej = jget(f"{store.url}{API}/stats")["rejections"]["bad_features"]
        assert rej["count"] == 3 and "non-finite" in rej["last_detail"]
        logged = " | ".join(r.getMessage() for r in caplog.records)
        assert "124 bytes of features, n=32 float32 values need 128" in logged
        assert "1 non-finite feature values (the first at index 5" in logged
        # the good one is stored, readable back, and nothing else
        rows = jget(f"{store.url}{API}/feedback?node={node.node_id}")["feedback"]
        assert [r["sample_id"] for r in rows] == [next(iter(cases))]
        got = jget(f"{store.url}{rows[0]['features_url']}")
        np.testing.assert_array_equal(np.asarray(got["values"], np.float32), good)
    finally:
        node.stop()


def _other_model(digits_dir: Path, out: Path) -> Path:
    """The same network saved again with other metadata: another file, another sha256."""
    import shutil

    out.mkdir()
    m = onnx.load(str(digits_dir / "model.onnx"))
    m.doc_string = "re-exported"
    onnx.save(m, str(out / "model.onnx"))
    replay = json.loads((digits_dir / "manifest.json").read_text())["learning"]["replay"]
    shutil.copy(digits_dir / replay, out / replay)
    return out / "model.onnx"


def test_the_cloud_retrains_the_head_from_features_of_the_same_model_only(
        loop, digits_dir, tmp_path):  # noqa: F811
    """A site shares only features. Its samples made under 1.0.1 (another model
    file) cannot train 1.0.0's head and are skipped with the reason; those made
    by 1.0.0 train it into 1.1.0, which serves better on the site's shift."""
    store, node = loop
    agent = node(feedback={"threshold": 1.0, "max_per_minute": 100000, "upload": "features"})
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["learning"]["gate"] = {"min_gain": 0.05, "max_regression": 0.05,
                                    "min_samples": 50, "min_heldout": 15}
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "a.aidc")
    publish(store, _other_model(digits_dir, tmp_path / "other"),
            {**manifest, "version": "1.0.1"}, digits_dir / "labels.txt", tmp_path / "b.aidc")
    held = np.load(digits_dir / "heldout.npz")
    X, y = blur(held["X_test"]), held["y_test"]
    Xt, yt = X[300:450], y[300:450]  # fresh site images, never sent

    def serve(version: str) -> None:
        assert http("PUT", f"{store.url}{API}/nodes/site-1/apps/digits",
                    {"version": version})[0] == 200
        wait_until(lambda: (a := node_app(store) or {}).get("version") == version
                   and a.get("status") == "ready", timeout=60)

    serve("1.0.1")
    labelled = _site(agent, X[260:300], y[260:300])  # features from the other model
    serve("1.0.0")
    base_acc = _accuracy(agent.http_url, Xt, yt)
    labelled += _site(agent, X[:250], y[:250])

    def labelled_in_cloud() -> int:
        rows = jget(f"{store.url}{API}/feedback?app=digits&limit=1000")["feedback"]
        return sum(r["label"] is not None for r in rows)

    wait_until(lambda: labelled_in_cloud() >= labelled, timeout=60)
    ds = jget(f"{store.url}{API}/apps/digits/dataset")
    assert ds["kinds"] == {"features": ds["items"]}
    assert {tuple(m["versions"]) for m in ds["features_by_model"].values()} == \
        {("1.0.0",), ("1.0.1",)}

    status, body = http("POST", f"{store.url}{API}/apps/digits/retrain", {
        "base_version": "1.0.0", "version": "1.1.0", "assign": ["site-1"], "by": "ops"})
    assert status == 202, body
    rid = json.loads(body)["retrain_id"]
    wait_until(lambda: jget(f"{store.url}{API}/retrains/{rid}")["state"] != "running",
               timeout=120, interval=0.3)
    rt = jget(f"{store.url}{API}/retrains/{rid}")
    assert rt["state"] == "published", rt
    feat = rt["lineage"]["dataset"]["features"]
    other = ds["features_by_model"]
    n_other = next(m["items"] for m in other.values() if m["versions"] == ["1.0.1"])
    assert feat["skipped"] == n_other > 0 and feat["used"] > 100
    (why, n), = feat["reasons"].items()
    assert n == n_other and "another model (1.0.1" in why
    assert rt["metrics"]["features"] == feat
    m = rt["metrics"]
    assert m["heldout"]["candidate"] >= m["heldout"]["base"] + 0.05
    wait_until(lambda: (a := node_app(store) or {}).get("version") == "1.1.0"
               and a.get("status") == "ready", timeout=90)
    new_acc = _accuracy(agent.http_url, Xt, yt)
    assert new_acc > base_acc + 0.05, (base_acc, new_acc)
    print(f"features-only retrain {m}; fresh site images 1.0.0 {base_acc:.3f} -> "
          f"1.1.0 {new_acc:.3f}")

    # from 1.0.1 nothing is usable: refused, saying why
    status, body = http("POST", f"{store.url}{API}/apps/digits/retrain",
                        {"base_version": "1.0.1", "version": "1.2.0"})
    err = json.loads(body)
    assert status == 409 and err["error"] == "not_enough_samples", body
    assert err["detail"]["features_skipped"]["used"] == n_other


def test_the_helper_comes_back_after_going_idle_and_says_why_it_cannot(digits_dir, tmp_path):  # noqa: F811
    from edge_node.sharing import FeatureSharing, FeaturesUnavailable

    fs = FeatureSharing(lambda app, version: digits_dir if version == "1.0.0" else None,
                        idle_s=0.3)
    X = np.load(digits_dir / "heldout.npz")["X_test"].astype(np.float32)
    p = tmp_path / "s.npy"
    np.save(p, X[:1])
    try:
        a = fs.features("digits", "1.0.0", "tensor/npy", p)
        import time

        time.sleep(1.0)  # the helper exits when idle ...
        b = fs.features("digits", "1.0.0", "tensor/npy", p)  # ... and starts again
        assert a == b and fs.stats["helper_starts"] == 2
        for version, kind, path in (("2.0.0", "no_model", p),
                                    ("1.0.0", "bad_input", tmp_path / "gone.npy")):
            with pytest.raises(FeaturesUnavailable) as err:
                fs.features("digits", version, "tensor/npy", path)
            assert err.value.kind == kind, err.value
    finally:
        fs.close()


def test_the_feature_job_trains_on_input_rows_and_feature_rows_alike(digits_dir, tmp_path):  # noqa: F811
    """Items with inputs go through the same extractor as the sites used, so both
    kinds are rows of one training set; a vector of the wrong length is skipped."""
    from appstore import feature_job

    head, model_path, _ = find_app_head(digits_dir)
    fx = FeatureExtractor(model_path, head)
    held = np.load(digits_dir / "heldout.npz")
    X, y = blur(held["X_test"]).astype(np.float32), held["y_test"]
    inputs, feats = [], []
    for i in range(200):
        hold = i % 5 == 0
        if i % 2:
            path = tmp_path / f"in{i}.npy"
            np.save(path, X[i:i + 1])
            inputs.append({"sample_id": f"in{i}", "path": str(path), "input_type": "tensor/npy",
                           "label_index": int(y[i]), "heldout": hold})
        else:
            path = tmp_path / f"f{i}.f32"
            fx(X[i:i + 1])[0].astype("<f4").tofile(path)
            feats.append({"sample_id": f"f{i}", "path": str(path), "label_index": int(y[i]),
                          "heldout": hold})
    (tmp_path / "short.f32").write_bytes(b"\0" * 8)
    feats.append({"sample_id": "short", "path": str(tmp_path / "short.f32"), "label_index": 1,
                  "heldout": False})
    (tmp_path / "in.json").write_text(json.dumps({"samples": inputs}))
    (tmp_path / "f.json").write_text(json.dumps({"samples": feats}))
    replay = json.loads((digits_dir / "manifest.json").read_text())["learning"]["replay"]
    out = tmp_path / "out"
    rc = feature_job.main(["--app-dir", str(digits_dir), "--samples-list",
                           str(tmp_path / "in.json"), "--features-list", str(tmp_path / "f.json"),
                           "--out", str(out), "--work", str(tmp_path / "work"),
                           "--replay", str(digits_dir / replay)])
    assert rc == 0
    gate = json.loads((out / "gate.json").read_text())
    prep = gate["prepared"]
    assert (prep["train_inputs"], prep["train_features"]) == (80, 80)
    assert prep["skipped"] == [{"sample_id": "short", "reason": "2 features, the head takes "
                                f"{head.n_features}"}]
    acc = gate["accuracy"]
    assert (acc["heldout"]["n_inputs"], acc["heldout"]["n_features"]) == (20, 20)
    assert acc["heldout"]["candidate"] > acc["heldout"]["base"]
    assert acc["replay"]["candidate"] >= acc["replay"]["base"] - 0.05
    ft = json.loads((out / "finetune.json").read_text())
    got = (out / ft["model"]["file"]).read_bytes()
    assert hashlib.sha256(got).hexdigest() == ft["model"]["sha256"]
