"""The node's event-loop HTTP server over real worker processes and real sockets.

Everything here goes through ``edge_node.httpd.serve`` exactly as the agent
uses it (a Flask app with the v2 blueprint), over TCP on loopback, to worker
processes on their Unix sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flask import Flask

from cloud_sync.manifest import load_manifest
from edge_node.httpd import serve
from edge_node.serving.registry import AppRegistry, ServedApp
from edge_node.serving.v2 import make_v2_blueprint
from edge_node.worker.client import WorkerClient
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import build_digits_app_dir, digit_png, load_test_split


def served_app(app_dir: Path, client, **kw) -> ServedApp:
    manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
    labels = (app_dir / "labels.txt").read_text().split()
    return ServedApp(name=manifest.name, version=manifest.version, sha256="0" * 64,
                     manifest=manifest, client=client, labels=labels, **kw)


def start_server(registry, **kw):
    app = Flask("serving-test")
    app.register_blueprint(make_v2_blueprint(registry, **kw))
    server, _ = serve(app, "127.0.0.1", 0)
    return server


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    app_dir = build_digits_app_dir(tmp_path_factory.mktemp("digits"))
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-sh-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    client = sup.start("digits", app_dir)
    results: list[tuple] = []
    registry = AppRegistry(result_callback=lambda *args: results.append(args))
    registry.add(served_app(app_dir, client))
    server = start_server(registry, max_body_bytes=256 * 1024)
    x, y = load_test_split(app_dir)
    yield SimpleNamespace(app_dir=app_dir, sup=sup, registry=registry, results=results,
                          server=server, port=server.server_port, x=x, y=y)
    server.shutdown()
    sup.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)


def conn(port: int, timeout: float = 10) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def call(c: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    c.request(method, path, body, headers or {})
    resp = c.getresponse()
    return resp.status, resp.read(), resp


def infer_body(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], **extra}).encode()


def output(body: dict, name: str) -> np.ndarray:
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(out["data"]).reshape(out["shape"])


def wait_for(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_v2_routes_answer_like_the_flask_blueprint(env):
    """Clients built against the v2 spec see the same answers as before the new server."""
    c = conn(env.port)
    status, body, _ = call(c, "GET", "/v2/health/live")
    assert status == 200 and json.loads(body) == {"live": True}
    assert call(c, "GET", "/v2/health/ready")[0] == 200
    assert json.loads(call(c, "GET", "/v2")[1])["name"] == "aidc-edge"
    assert json.loads(call(c, "GET", "/v2/models")[1])["models"] == [
        {"name": "digits", "version": "1.0.0", "ready": True}]
    for url in ("/v2/models/digits", "/v2/models/digits/versions/1.0.0"):
        meta = json.loads(call(c, "GET", url)[1])
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    status, body, resp = call(c, "GET", "/v2/models/digits/ready")
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    status, body, _ = call(c, "POST", "/v2/models/digits/infer", infer_body(env.x, id="r1"),
                           {"Content-Type": "application/json"})
    got = json.loads(body)
    assert status == 200 and got["id"] == "r1" and got["model_version"] == "1.0.0"
    assert (output(got, "label") == env.y).mean() > 0.9
    status, body, _ = call(c, "POST", "/v2/models/digits/versions/1.0.0/infer",
                           infer_body(env.x[:3], outputs=[{"name": "label"}]))
    assert status == 200 and [o["name"] for o in json.loads(body)["outputs"]] == ["label"]


def test_classify_raw_and_multipart(env):
    """Image upload works as a raw body (event loop) and as a form (through Flask)."""
    c = conn(env.port)
    hits = 0
    for i in range(30):
        status, body, _ = call(c, "POST", "/v2/models/digits/classify", digit_png(env.x[i]),
                               {"Content-Type": "image/png"})
        assert status == 200, body
        hits += json.loads(body)["label"] == str(env.y[i])
    assert hits >= 27
    boundary = "xXx"
    png = digit_png(env.x[0])
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"d.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + png + \
        f"\r\n--{boundary}--\r\n".encode()
    status, body, _ = call(c, "POST", "/v2/models/digits/classify", form,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and "label" in json.loads(body)


def test_binary_tensor_extension_round_trip(env):
    """Triton clients with binary_data=True send and get raw tensor bytes, same answers."""
    x = env.x[:5].astype(np.float32)
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                                   {"name": "label"}]}).encode()
    c = conn(env.port)
    status, body, resp = call(c, "POST", "/v2/models/digits/infer", head + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head))})
    assert status == 200, body
    n = int(resp.getheader("Inference-Header-Content-Length"))
    meta = json.loads(body[:n])
    probs_meta, label_meta = meta["outputs"]
    assert probs_meta["parameters"]["binary_data_size"] == 5 * 10 * 4
    probs = np.frombuffer(body[n:], np.float32).reshape(probs_meta["shape"])
    _, jbody, _ = call(c, "POST", "/v2/models/digits/infer", infer_body(x))
    assert np.allclose(probs, output(json.loads(jbody), "probabilities"), atol=1e-6)
    assert label_meta["data"] == output(json.loads(jbody), "label").tolist()
    bad = [(head + raw[:-4], "runs past the end"), (head + raw + b"xxxx", "not claimed")]
    for payload, message in bad:
        status, body, _ = call(c, "POST", "/v2/models/digits/infer", payload, {
            "Inference-Header-Content-Length": str(len(head))})
        assert status == 400 and message in json.loads(body)["error"]


def test_errors_keep_their_status_and_the_connection(env):
    """400/404/405 say what is wrong, and the keep-alive connection keeps serving."""
    c = conn(env.port)
    status, body, _ = call(c, "POST", "/v2/models/digits/infer", b"{nope")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, body, _ = call(c, "POST", "/v2/models/digits/infer",
                           infer_body(np.zeros((1, 63), np.float32)))
    assert status == 400 and "expects" in json.loads(body)["error"]
    status, body, _ = call(c, "POST", "/v2/models/nope/infer", b"{}")
    assert status == 404 and "unknown model" in json.loads(body)["error"]
    assert call(c, "GET", "/v2/models/digits/versions/9/ready")[0] == 404
    assert call(c, "GET", "/v2/models/digits/infer")[0] == 405  # Flask's answer
    assert call(c, "GET", "/nothing/here")[0] == 404
    status, body, _ = call(c, "POST", "/v2/models/digits/classify", b"GIF89a junk")
    assert status == 400 and "unreadable image" in json.loads(body)["error"]
    assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))[0] == 200
    assert len([k for k in env.server.conns]) >= 1


def test_oversized_bodies_get_413_and_the_connection_closes(env):
    """An upload over the limit is refused from its headers, chunked or not."""
    big = b"\0" * (257 * 1024)
    c = conn(env.port)
    status, body, resp = call(c, "POST", "/v2/models/digits/classify", big)
    assert status == 413 and "byte limit" in json.loads(body)["error"]
    assert resp.getheader("Connection") == "close"

    def chunks():
        for _ in range(70):
            yield b"\0" * 4096

    c = conn(env.port)
    c.request("POST", "/v2/models/digits/infer", chunks(), encode_chunked=True,
              headers={"Transfer-Encoding": "chunked"})
    resp = c.getresponse()
    assert resp.status == 413
    # the 100-continue handshake: the refusal comes before the body is sent
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/digits/classify HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 999999\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert call(conn(env.port), "GET", "/v2/health/live")[0] == 200


def test_keep_alive_pipelining_and_connection_close(env):
    """One connection carries many requests, pipelined ones are answered in order."""
    c = conn(env.port)
    socks = set()
    for i in range(20):
        status, body, _ = call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[i:i + 1]))
        assert status == 200 and json.loads(body)["model_name"] == "digits"
        socks.add(c.sock.getsockname()[1])  # a new connection would have a new port
    assert len(socks) == 1 and c.sock is not None
    reqs = b""
    for i in range(3):
        b = infer_body(env.x[i:i + 1], id=f"p{i}")
        reqs += (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(b)) + b
    reqs += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(reqs)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 4
    ids = [data.index(f'"id":"p{i}"'.encode()) for i in range(3)]
    assert ids == sorted(ids) and data.index(b'{"live":true}') > ids[-1]
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200") and s.recv(4096) == b""  # 1.0: closed


def test_many_concurrent_callers_get_their_own_answers(env):
    """Parallel keep-alive callers never see each other's replies."""
    expected = env.y[:160]
    got = np.full(160, -1)
    errors = []

    def run(k: int) -> None:
        c = conn(env.port)
        try:
            for i in range(k, 160, 16):
                status, body, _ = call(c, "POST", "/v2/models/digits/infer",
                                       infer_body(env.x[i:i + 1], outputs=[{"name": "label"}]))
                assert status == 200, body
                got[i] = json.loads(body)["outputs"][0]["data"][0]
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    single = np.array([output(json.loads(call(conn(env.port), "POST", "/v2/models/digits/infer",
                                              infer_body(env.x[i:i + 1]))[1]), "label")[0]
                       for i in range(160)])
    assert got.tolist() == single.tolist() and (got == expected).mean() > 0.9


def test_result_hook_sees_results_after_the_reply(env):
    """Hard-example capture gets each result; a failing hook never fails the request."""
    env.results.clear()
    c = conn(env.port)
    assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:4]))[0] == 200
    assert call(c, "POST", "/v2/models/digits/classify", digit_png(env.x[0]))[0] == 200
    wait_for(lambda: len(env.results) == 5)
    assert [r[4] for r in env.results] == ["v2-infer"] * 4 + ["v2-classify"]
    assert env.results[-1][3] == digit_png(env.x[0]) and env.results[0][2].shape == (1, 64)
    registry = AppRegistry(result_callback=lambda *a: 1 / 0)
    registry.add(env.registry.get("digits"))
    server = start_server(registry)
    try:
        c = conn(server.server_port)
        assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:2]))[0] == 200
        assert call(c, "POST", "/v2/models/digits/classify", digit_png(env.x[0]))[0] == 200
    finally:
        server.shutdown()


def test_not_ready_and_unreachable_models_get_503(env, tmp_path):
    """"Try again later" is 503, distinct from a bad request."""
    registry = AppRegistry()
    registry.add(served_app(env.app_dir, WorkerClient(tmp_path / "no.sock")))
    server = start_server(registry)
    try:
        c = conn(server.server_port)
        status, body, _ = call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))
        assert status == 503 and "unavailable" in json.loads(body)["error"]
        assert call(c, "POST", "/v2/models/digits/classify", digit_png(env.x[0]))[0] == 503
        meta = json.loads(call(c, "GET", "/v2/models/digits")[1])  # manifest fallback
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        registry.get("digits").ready = False
        assert call(c, "GET", "/v2/health/ready")[0] == 503
        assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))[0] == 503
    finally:
        server.shutdown()


MUTE_WORKER = textwrap.dedent("""
    import sys, time
    from edge_node.worker import wire
    from edge_node.worker.endpoint import UnixListener
    listener = UnixListener(sys.argv[1])
    print("READY", flush=True)
    conn = listener.accept()
    wire.server_handshake(conn, None)
    wire.read_frame(conn)          # take the request ...
    print("GOT", flush=True)
    time.sleep(600)                # ... and never answer
""")


def test_a_worker_killed_mid_request_gives_503_not_a_hang(env, tmp_path):
    """The request in flight when its worker dies is answered 503 at once."""
    sock = Path(tempfile.mkdtemp(prefix="aidc-mute-", dir="/tmp")) / "w.sock"
    proc = subprocess.Popen([sys.executable, "-c", MUTE_WORKER, str(sock)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    registry = AppRegistry()
    registry.add(served_app(env.app_dir, WorkerClient(sock, timeout=30)))
    server = start_server(registry)
    try:
        assert proc.stdout.readline().strip() == b"READY"
        answer: list = []
        c = conn(server.server_port, timeout=20)
        t = threading.Thread(target=lambda: answer.append(
            call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))))
        t.start()
        assert proc.stdout.readline().strip() == b"GOT"  # the worker holds the request
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        t.join(10)
        assert answer and answer[0][0] == 503 and time.monotonic() - t0 < 5
        assert "unavailable" in json.loads(answer[0][1])["error"]
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_a_mute_worker_times_out_with_503(env):
    """A wedged worker costs its callers the timeout, then 503; never an open-ended wait."""
    sock = Path(tempfile.mkdtemp(prefix="aidc-mute-", dir="/tmp")) / "w.sock"
    proc = subprocess.Popen([sys.executable, "-c", MUTE_WORKER, str(sock)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    registry = AppRegistry()
    registry.add(served_app(env.app_dir, WorkerClient(sock, timeout=0.5)))
    server = start_server(registry)
    try:
        assert proc.stdout.readline().strip() == b"READY"
        t0 = time.monotonic()
        status, body, _ = call(conn(server.server_port), "POST", "/v2/models/digits/infer",
                               infer_body(env.x[:1]))
        assert status == 503 and "did not answer within 0.5s" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        shutil.rmtree(sock.parent, ignore_errors=True)


def test_http_recovers_after_a_real_worker_is_killed(env):
    """While the supervisor restarts a killed worker HTTP answers 503, then 200 again."""
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-shk-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    try:
        registry = AppRegistry()
        registry.add(served_app(env.app_dir, sup.start("digits", env.app_dir)))
        server = start_server(registry)
        c = conn(server.server_port)
        assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))[0] == 200
        os.kill(sup.status()["digits"]["pid"], signal.SIGKILL)
        codes = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[:1]))[0]
            codes.add(status)
            if status == 200 and sup.status()["digits"]["restarts"] == 1:
                break
            time.sleep(0.05)
        assert codes <= {200, 503} and status == 200
        server.shutdown()
    finally:
        sup.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_shutdown_closes_the_port(env):
    """Stopping the agent frees its port and ends open connections."""
    server = start_server(env.registry)
    port = server.server_port
    c = conn(port)
    assert call(c, "GET", "/v2/health/live")[0] == 200
    server.shutdown()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_per_app_counters_for_metrics(env):
    """Requests, errors and a latency histogram per app, for /metrics and the status page."""
    svc = env.server.service
    before = svc.stats().get("digits", {"requests": 0, "errors": 0})
    c = conn(env.port)
    for i in range(5):
        assert call(c, "POST", "/v2/models/digits/infer", infer_body(env.x[i:i + 1]))[0] == 200
    assert call(c, "POST", "/v2/models/digits/classify", digit_png(env.x[0]))[0] == 200
    assert call(c, "POST", "/v2/models/digits/classify", b"junk")[0] == 400
    after = svc.stats()["digits"]
    assert after["requests"] - before["requests"] == 7
    assert after["errors"] == before["errors"]  # a 400 is the caller's fault, not an error
    buckets = after["latency_seconds_buckets"]
    assert buckets["+Inf"] == after["requests"] and after["latency_seconds_sum"] > 0
    assert list(buckets.values()) == sorted(buckets.values())


def test_head_requests_get_headers_only(env):
    """HEAD (through Flask) answers the headers of GET and no body, keeping the connection."""
    c = conn(env.port)
    status, body, resp = call(c, "HEAD", "/v2/models/digits")
    assert status == 200 and body == b"" and int(resp.getheader("Content-Length")) > 0
    assert call(c, "GET", "/v2/health/live")[0] == 200
