"""The Open Inference Protocol v2 HTTP API over real workers and real ONNX Runtime."""

from __future__ import annotations

import json
import os
from io import BytesIO
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flask import Flask
from werkzeug.serving import make_server

from cloud_sync.manifest import load_manifest
from edge_node.serving.registry import AppRegistry, ServedApp
from edge_node.serving.v2 import make_v2_blueprint
from edge_node.worker.client import WorkerClient
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import build_digits_app_dir, digit_png, load_test_split


def make_flask(registry, **kw) -> Flask:
    app = Flask("v2-test")
    app.register_blueprint(make_v2_blueprint(registry, **kw))
    return app


def served_app(app_dir: Path, client: WorkerClient, **kw) -> ServedApp:
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
    labels = (app_dir / "labels.txt").read_text().split()
    return ServedApp(name=manifest.name, version=manifest.version, sha256="0" * 64,
                     manifest=manifest, client=client, labels=labels, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    app_dir = build_digits_app_dir(tmp_path_factory.mktemp("digits"))
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-v2-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    client = sup.start("digits", app_dir)
    results: list[tuple] = []
    registry = AppRegistry(result_callback=lambda *args: results.append(args))
    registry.add(served_app(app_dir, client))
    x, y = load_test_split(app_dir)
    yield SimpleNamespace(app_dir=app_dir, sup=sup, registry=registry, results=results,
                          http=make_flask(registry).test_client(), x=x, y=y)
    sup.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)


def infer_body(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], **extra}


def output(resp_json: dict, name: str) -> np.ndarray:
    out = next(o for o in resp_json["outputs"] if o["name"] == name)
    return np.asarray(out["data"]).reshape(out["shape"])


def test_health_and_server_metadata(env):
    """Load balancers and v2 clients probe these before sending any work."""
    assert env.http.get("/v2/health/live").status_code == 200
    ready = env.http.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json["ready"] is True
    meta = env.http.get("/v2").json
    assert meta["name"] == "aidc-edge" and "version" in meta and "extensions" in meta
    assert env.http.get("/v2/models").json["models"] == [
        {"name": "digits", "version": "1.0.0", "ready": True}]


def test_model_metadata_and_readiness(env):
    """Existing v2 clients build requests from this metadata: real names, FP32, -1 dims."""
    for url in ("/v2/models/digits", "/v2/models/digits/versions/1.0.0"):
        meta = env.http.get(url).json
        assert meta["name"] == "digits" and meta["versions"] == ["1.0.0"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert {"name": "label", "datatype": "INT64", "shape": [-1]} in meta["outputs"]
    r = env.http.get("/v2/models/digits/ready")
    assert r.status_code == 200 and r.json == {"name": "digits", "ready": True}
    assert env.http.get("/v2/models/digits/versions/9.9.9").status_code == 404


def test_infer_over_http_is_accurate_and_feeds_the_result_hook(env):
    """A whole held-out batch through JSON keeps the model's accuracy; each item is reported."""
    env.results.clear()
    r = env.http.post("/v2/models/digits/infer", json=infer_body(env.x))
    assert r.status_code == 200, r.json
    body = r.json
    assert body["model_name"] == "digits" and body["model_version"] == "1.0.0"
    assert "id" not in body
    labels = output(body, "label")
    probs = output(body, "probabilities")
    assert probs.shape == (len(env.x), 10) and labels.dtype.kind == "i"
    assert (labels == env.y).mean() > 0.9
    assert len(env.results) == 64  # capped per request
    app, result, tensor, image, source = env.results[0]
    assert app.name == "digits" and source == "v2-infer" and image is None
    assert tensor.shape == (1, 64) and np.array_equal(tensor[0], env.x[0])
    assert result["index"] == int(labels[0]) and len(result["top_k"]) == 3


def test_infer_accepts_nested_data_selects_outputs_and_echoes_id(env):
    """Nested `data`, `outputs` selection and `id` are spec features clients rely on."""
    x = env.x[:3]
    body = {"id": "req-7", "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                       "data": x.tolist()}], "outputs": [{"name": "label"}]}
    env.results.clear()
    r = env.http.post("/v2/models/digits/versions/1.0.0/infer", json=body)
    assert r.status_code == 200, r.json
    assert r.json["id"] == "req-7"
    assert [o["name"] for o in r.json["outputs"]] == ["label"]
    assert r.json["outputs"][0]["datatype"] == "INT64" and r.json["outputs"][0]["shape"] == [3]
    assert len(env.results) == 3  # the hook still sees the probabilities


def test_classify_images_raw_and_multipart(env):
    """Uploading an image (raw body or form field) gives the answer a user expects."""
    env.results.clear()
    hits = 0
    for i in range(100):
        png = digit_png(env.x[i])
        r = env.http.post("/v2/models/digits/classify", data=png, content_type="image/png")
        assert r.status_code == 200, r.json
        hits += r.json["label"] == str(env.y[i])
    assert hits / 100 > 0.9
    assert r.json["model_name"] == "digits" and len(r.json["top_k"]) == 3
    _, _, tensor, image, source = env.results[-1]
    assert source == "v2-classify" and image == png and tensor.shape == (1, 64)
    r = env.http.post("/v2/models/digits/classify", content_type="multipart/form-data",
                      data={"file": (BytesIO(digit_png(env.x[0])), "d.png", "image/png")})
    assert r.status_code == 200 and r.json["label"] == env.results[0][1]["label"]


def _bad(x=None, **tensor) -> dict:
    t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    t.update(tensor)
    return {"inputs": [t]}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        ({"inputs": []}, 400, "non-empty list"),
        ({"outputs": []}, 400, "non-empty list"),
        (_bad(name="pixels"), 400, "unknown input 'pixels'"),
        (_bad(shape=[1, 63]), 400, "needs 63 values but 'data' has 64"),
        (_bad(shape=[1, 63], data=[0.0] * 63), 400, "shape [1, 63] but the model expects"),
        (_bad(datatype="INT64", data=[0] * 64), 400, "datatype INT64 but the model expects FP32"),
        (_bad(datatype="FP99"), 400, "unsupported datatype 'FP99'"),
        (_bad(data=["a"] * 64), 400, "FP32 data must be numbers"),
        (_bad(data=[[0.0] * 60, [0.0] * 4]), 400, "regularly nested"),
        (_bad(shape=[1, -64]), 400, "non-negative integers"),
        ({**_bad(), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ],
)
def test_bad_infer_requests_get_400_with_the_reason(env, body, status, message):
    """A malformed request must say what is wrong, and never hurt the next request."""
    if isinstance(body, bytes):
        kw = {"data": body, "content_type": "application/json"}
    else:
        kw = {"json": body}
    r = env.http.post("/v2/models/digits/infer", **kw)
    assert r.status_code == status and message in r.json["error"], r.json
    ok = env.http.post("/v2/models/digits/infer", json=infer_body(env.x[:1]))
    assert ok.status_code == 200


def test_unknown_models_versions_and_bad_images(env):
    """404 for what is not served, 400 for an unreadable image, and service continues."""
    for method, url in [("get", "/v2/models/nope"), ("get", "/v2/models/nope/ready"),
                        ("post", "/v2/models/nope/infer"), ("post", "/v2/models/nope/classify"),
                        ("post", "/v2/models/digits/versions/2.0.0/infer")]:
        r = getattr(env.http, method)(url, json={})
        assert r.status_code == 404 and "error" in r.json, url
    r = env.http.post("/v2/models/digits/classify", data=b"GIF89a broken", content_type="image/gif")
    assert r.status_code == 400 and "unreadable image" in r.json["error"]
    r = env.http.post("/v2/models/digits/classify", data=b"", content_type="image/png")
    assert r.status_code == 400 and "no image" in r.json["error"]
    r = env.http.post("/v2/models/digits/classify", content_type="multipart/form-data",
                      data={"other": "x"})
    assert r.status_code == 400 and "'file'" in r.json["error"]
    png = digit_png(env.x[0])
    assert env.http.post("/v2/models/digits/classify", data=png).status_code == 200


def test_oversized_bodies_get_413(env):
    """A huge upload must be refused up front, not buffered and decoded."""
    http = make_flask(env.registry, max_body_bytes=1000).test_client()
    big = b"\x00" * 2000
    r = http.post("/v2/models/digits/classify", data=big, content_type="image/png")
    assert r.status_code == 413 and "1000 byte limit" in r.json["error"]
    r = http.post("/v2/models/digits/infer", json=infer_body(env.x[:5]))
    assert r.status_code == 413
    r = http.post("/v2/models/digits/classify", content_type="multipart/form-data",
                  data={"file": (BytesIO(big), "big.png")})
    assert r.status_code == 413
    assert http.post("/v2/models/digits/classify", data=digit_png(env.x[0])).status_code == 200


def test_not_ready_and_unreachable_models_get_503(env, tmp_path):
    """Callers must be able to tell "try again later" from "your request is wrong"."""
    registry = AppRegistry()
    registry.add(served_app(env.app_dir, WorkerClient(env.sup.client("digits").socket_path),
                            ready=False))
    strict = make_flask(registry).test_client()
    assert strict.get("/v2/health/ready").status_code == 503
    assert strict.get("/v2/health/ready").json["not_ready"] == ["digits"]
    assert strict.get("/v2/models/digits/ready").status_code == 503
    assert strict.post("/v2/models/digits/infer", json=infer_body(env.x[:1])).status_code == 503
    lenient = make_flask(registry, strict_readiness=False).test_client()
    assert lenient.get("/v2/health/ready").status_code == 200
    registry.loaded = False
    assert lenient.get("/v2/health/ready").status_code == 503

    gone = AppRegistry()
    gone.add(served_app(env.app_dir, WorkerClient(tmp_path / "no.sock")))
    http = make_flask(gone).test_client()
    r = http.post("/v2/models/digits/infer", json=infer_body(env.x[:1]))
    assert r.status_code == 503 and "unavailable" in r.json["error"]
    r = http.post("/v2/models/digits/classify", data=digit_png(env.x[0]))
    assert r.status_code == 503
    meta = http.get("/v2/models/digits").json  # falls back to the manifest
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


def test_a_failing_result_hook_never_fails_the_request(env):
    """Hard-example capture is best effort; inference answers regardless."""
    registry = AppRegistry(result_callback=lambda *a: 1 / 0)
    registry.add(env.registry.get("digits"))
    http = make_flask(registry).test_client()
    assert http.post("/v2/models/digits/infer", json=infer_body(env.x[:2])).status_code == 200
    assert http.post("/v2/models/digits/classify", data=digit_png(env.x[0])).status_code == 200


def _req(url: str, body: bytes | None = None, ctype: str = "application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_real_http_server_with_concurrent_clients(env):
    """Through a real socket and HTTP server, with parallel callers, as a site client sees it."""
    server = make_server("127.0.0.1", 0, make_flask(env.registry), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert _req(f"{base}/v2/health/ready")[0] == 200
        payload = json.dumps(infer_body(env.x)).encode()
        status, body = _req(f"{base}/v2/models/digits/infer", payload)
        assert status == 200 and (output(body, "label") == env.y).mean() > 0.9
        status, body = _req(f"{base}/v2/models/nope/infer", b"{}")
        assert status == 404 and "unknown model" in body["error"]
        answers: dict[int, str] = {}

        def classify(i: int) -> None:
            answers[i] = _req(f"{base}/v2/models/digits/classify", digit_png(env.x[i]),
                              "image/png")[1]["label"]

        threads = [threading.Thread(target=classify, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(answers[i] == str(env.y[i]) for i in range(40)) / 40 > 0.9
    finally:
        server.shutdown()


def test_http_recovers_after_the_worker_is_killed(env, tmp_path):
    """While a worker restarts, HTTP says 503; afterwards the same app serves again."""
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-v2k-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    try:
        registry = AppRegistry()
        registry.add(served_app(env.app_dir, sup.start("digits", env.app_dir)))
        http = make_flask(registry).test_client()
        os.kill(sup.status()["digits"]["pid"], signal.SIGKILL)
        codes = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = http.post("/v2/models/digits/infer", json=infer_body(env.x[:1]))
            codes.add(r.status_code)
            if r.status_code == 200 and sup.status()["digits"]["restarts"] == 1:
                break
            time.sleep(0.05)
        assert codes <= {200, 503} and 503 in codes and r.status_code == 200
    finally:
        sup.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
