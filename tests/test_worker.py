"""The data plane's model workers: real processes, real ONNX Runtime, real digits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_sync.manifest import Postprocess, Preprocess, TensorSpec
from edge_node.worker import BadInput, WorkerError, WorkerStartError, WorkerUnavailable
from edge_node.worker.client import WorkerClient
from edge_node.worker.postprocess import classify
from edge_node.worker.preprocess import image_to_tensor, tensor_to_png
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import (
    wait_for,
    build_digits_app_dir,
    digit_png,
    digits_manifest,
    load_test_split,
    pid_alive,
    worker_pids,
)


@pytest.fixture(scope="module")
def test_split(app_dir):
    return load_test_split(app_dir)


def _short_dir() -> Path:
    # AF_UNIX socket paths must stay under ~107 bytes; pytest's tmp_path can be long.
    return Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp"))


@pytest.fixture
def run_dir():
    d = _short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sup(run_dir):
    s = WorkerSupervisor(run_dir, restart_budget=(3, 60.0))
    yield s
    s.stop_all()
    assert worker_pids(str(run_dir)) == []


@pytest.fixture(scope="module")
def digits_client(app_dir):
    d = _short_dir()
    s = WorkerSupervisor(d)
    client = s.start("digits", app_dir)
    yield client
    s.stop_all()
    shutil.rmtree(d, ignore_errors=True)


# --- pre/postprocessing (pure functions, real cv2 codecs) --------------------


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    return buf.tobytes()


def test_preprocess_channel_order_layout_and_normalisation():
    """A swapped colour order or layout silently ruins accuracy; pin each option."""
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # B, G, R
    img = _png(bgr)
    spec = TensorSpec(name="x", dtype="float32", shape=[None, 3, 2, 3])
    nchw = image_to_tensor(img, Preprocess(color="rgb", layout="NCHW", scale=1.0), spec)
    assert nchw.shape == (1, 3, 2, 3) and nchw.dtype == np.float32
    assert nchw[0, :, 0, 0].tolist() == [30, 20, 10]  # R first
    nhwc = image_to_tensor(img, Preprocess(color="bgr", layout="NHWC", scale=1.0),
                           TensorSpec(name="x", shape=[1, 2, 3, 3]))
    assert nhwc.shape == (1, 2, 3, 3) and nhwc[0, 0, 0].tolist() == [10, 20, 30]
    norm = image_to_tensor(
        img, Preprocess(color="rgb", layout="NHWC", scale=0.1, mean=[3, 2, 1], std=[2, 2, 2],
                        invert=True), TensorSpec(name="x", shape=[1, 2, 3, 3]))
    expected = ((255 - np.array([30, 20, 10])) * 0.1 - np.array([3, 2, 1])) / 2
    assert np.allclose(norm[0, 1, 2], expected, atol=1e-4)


def test_preprocess_resizes_to_model_dims_and_casts_integer_inputs():
    """With no resize option the model's fixed H, W apply; uint8 models get rounded pixels."""
    img = _png(np.full((40, 20, 3), 200, np.uint8))
    spec = TensorSpec(name="x", dtype="uint8", shape=[1, 3, 8, 4])
    x = image_to_tensor(img, Preprocess(color="rgb", layout="NCHW", scale=1.0), spec)
    assert x.shape == (1, 3, 8, 4) and x.dtype == np.uint8 and int(x.max()) == 200


def test_preprocess_rejects_unreadable_images_with_a_reason():
    """A garbage upload must become a clear 400, not a crash deep in OpenCV."""
    pre, spec = Preprocess(color="gray", layout="flat"), TensorSpec(name="x", shape=[1, 64])
    with pytest.raises(BadInput, match="unreadable image"):
        image_to_tensor(b"this is not an image", pre, spec)
    with pytest.raises(BadInput, match="empty image"):
        image_to_tensor(b"", pre, spec)
    with pytest.raises(BadInput, match="unreadable image"):
        image_to_tensor(_png(np.zeros((8, 8), np.uint8))[:30], pre, spec)


def test_classify_softmax_top_k_and_default_labels():
    """The answer a user sees: best label, ordered top-k, labels defaulting to the index."""
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], np.float32)
    res = classify(logits, Postprocess(softmax=True, top_k=3), ["a", "b"])
    assert [t["index"] for t in res["top_k"]] == [1, 2, 0]
    assert [t["label"] for t in res["top_k"]] == ["b", "2", "a"]
    assert res["label"] == "b" and res["index"] == 1
    assert abs(sum(res["scores"]) - 1.0) < 1e-6 and res["score"] == max(res["scores"])
    raw = classify(logits, Postprocess(softmax=False, top_k=10), None)
    assert raw["scores"] == [1.0, 3.0, 2.0, 0.0] and len(raw["top_k"]) == 4


def test_tensor_to_png_inverts_preprocessing(test_split):
    """Hard-example previews must show the image the model actually saw."""
    x, _ = test_split
    pre = Preprocess(**digits_manifest()["preprocess"])
    spec = TensorSpec(name="input", shape=[None, 64])
    tensor = image_to_tensor(digit_png(x[3]), pre, spec)
    back = cv2.imdecode(np.frombuffer(tensor_to_png(tensor, pre), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert back.shape == (8, 8)
    assert np.abs(back.astype(np.float32) * 16 / 255 - x[3].reshape(8, 8)).max() < 0.1


# --- a served worker ---------------------------------------------------------


def test_worker_infer_is_accurate_on_held_out_digits(digits_client, test_split):
    """Batch and single-sample inference through the socket give the model's real accuracy."""
    x, y = test_split
    out = digits_client.infer({"input": x})
    assert set(out) == {"label", "probabilities"}
    assert out["probabilities"].shape == (len(x), 10)
    assert (out["label"] == y).mean() > 0.9
    single = [int(digits_client.infer({"input": x[i:i + 1]}, ["label"])["label"][0])
              for i in range(50)]
    assert single == out["label"][:50].tolist()


def test_worker_classifies_png_images(digits_client, test_split):
    """The image path (decode, resize, scale) must keep the accuracy of raw tensors."""
    x, y = test_split
    hits = 0
    for i in range(150):
        result, tensor = digits_client.classify(digit_png(x[i]))
        hits += result["label"] == str(y[i])
        assert tensor.shape == (1, 64) and np.abs(tensor[0] - x[i]).max() < 0.05
        assert len(result["top_k"]) == 3 and result["index"] == int(result["label"])
    assert hits / 150 > 0.9


def test_worker_reports_its_real_tensors(digits_client):
    """Metadata comes from the loaded session, in v2 naming, -1 for symbolic dims."""
    meta = digits_client.meta()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]} in meta["outputs"]
    assert meta["classify"] is True and meta["name"] == "digits"


def test_concurrent_callers_share_one_client(digits_client, test_split):
    """Many threads on one client each get their own answers (no crossed replies)."""
    x, _ = test_split
    expected = digits_client.infer({"input": x[:240]}, ["label"])["label"]
    got = np.full(240, -1)
    errors = []

    def run(k: int) -> None:
        try:
            for i in range(k, 240, 8):
                got[i] = digits_client.infer({"input": x[i:i + 1]}, ["label"])["label"][0]
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"op": "infer", "inputs": {"pixels": np.zeros((1, 64), np.float32)}},
         "unknown input 'pixels'"),
        ({"op": "infer", "inputs": {"input": np.zeros((1, 63), np.float32)}}, "shape [1, 63]"),
        ({"op": "infer", "inputs": {"input": np.zeros((64,), np.float32)}}, "expects [-1, 64]"),
        ({"op": "infer", "inputs": {"input": np.zeros((1, 64), np.float64)}}, "datatype FP64"),
        ({"op": "infer", "inputs": {"input": [[0.0] * 64]}}, "must be a numpy array"),
        ({"op": "infer", "inputs": {}}, "non-empty"),
        ({"op": "infer", "inputs": {"input": np.zeros((1, 64), np.float32)}, "outputs": ["nope"]},
         "unknown output 'nope'"),
        ({"op": "classify", "image": b"\x89PNG garbage"}, "unreadable image"),
        ({"op": "classify", "image": "not bytes"}, "must be bytes"),
        ({"op": "explode"}, "unknown op"),
        ("not a dict", "unknown op"),
    ],
)
def test_bad_requests_are_400s_and_the_worker_keeps_serving(digits_client, request_, message):
    """A bad caller gets a 400 that says what is wrong; the worker stays up for everyone."""
    pid = digits_client.ping()["pid"]
    with pytest.raises(WorkerError) as info:
        digits_client.request(request_)
    assert info.value.status == 400 and message in info.value.message
    assert digits_client.ping()["pid"] == pid
    out = digits_client.infer({"input": np.zeros((2, 64), np.float32)})
    assert out["probabilities"].shape == (2, 10)


# --- supervision -------------------------------------------------------------


def test_killed_worker_is_restarted_and_serves_again(sup, app_dir, test_split):
    """A model process crash must heal by itself, behind the same client."""
    x, y = test_split
    client = sup.start("digits", app_dir)
    pid = sup.status()["digits"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sup.status()["digits"]["state"] == "ready"
             and sup.status()["digits"]["pid"] not in (None, pid), what="restart")
    st = sup.status()["digits"]
    assert st["restarts"] == 1 and "SIGKILL" in st["last_error"]
    assert (client.infer({"input": x})["label"] == y).mean() > 0.9
    assert sup.client("digits") is client


def test_restart_budget_exhausted_marks_the_worker_failed(run_dir, tmp_path, test_split):
    """A worker that keeps dying must stop being restarted and say why, loudly."""
    app = build_digits_app_dir(tmp_path / "app")
    sup = WorkerSupervisor(run_dir, restart_budget=(2, 60.0))
    try:
        sup.start("digits", app)
        # the app dir goes bad under the running worker (disk corruption, bad edit) ...
        broken = digits_manifest()
        broken["model"]["inputs"][0]["name"] = "pixels"
        (app / "manifest.json").write_text(json.dumps(broken))
        os.kill(sup.status()["digits"]["pid"], signal.SIGKILL)  # ... then it crashes
        wait_for(lambda: sup.status()["digits"]["state"] == "failed", what="state failed")
        st = sup.status()["digits"]
        assert st["restarts"] == 2 and st["pid"] is None
        assert "'pixels'" in st["last_error"]
        assert sup.client("digits") is None
        assert worker_pids(str(run_dir)) == []
    finally:
        sup.stop_all()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["model"]["inputs"][0].update(name="pixels"), "input 'pixels' declared"),
        (lambda m: m["model"]["inputs"][0].update(dtype="int64"), "the manifest says int64"),
        (lambda m: m["model"]["inputs"][0].update(shape=[None, 8, 8]), "has rank 3"),
        (lambda m: m["model"]["outputs"][1].update(shape=[None, 12]), "dim 1 is 12"),
        (lambda m: m["postprocess"].update(output="logits"), "postprocess.output 'logits'"),
        (lambda m: m["preprocess"].update(mean=[0, 0]), "preprocess/postprocess do not fit"),
    ],
)
def test_manifest_model_mismatch_refuses_to_start(sup, tmp_path, edit, message):
    """A package whose manifest lies about its model must fail at start with the reason."""
    manifest = digits_manifest()
    edit(manifest)
    app = build_digits_app_dir(tmp_path / "app", manifest)
    with pytest.raises(WorkerStartError) as info:
        sup.start("digits", app)
    assert message in str(info.value) and "exited with code 2" in info.value.reason
    assert sup.status()["digits"]["state"] == "failed"
    assert message in sup.status()["digits"]["last_error"]


def test_unloadable_model_refuses_to_start(sup, tmp_path):
    """A corrupt model file is reported as such, not as a hang or a silent exit."""
    app = build_digits_app_dir(tmp_path / "app")
    (app / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(WorkerStartError, match="cannot serve"):
        sup.start("digits", app)


def test_stop_all_leaves_no_processes_and_nothing_restarts(sup, run_dir, app_dir):
    """An intentional stop is final: no stray processes, no zombie restarts."""
    sup.start("a", app_dir)
    sup.start("b", app_dir, threads=2)
    pids = [sup.status()[k]["pid"] for k in ("a", "b")]
    assert all(pid_alive(p) for p in pids)
    assert sorted(worker_pids(str(run_dir))) == sorted(pids)
    sup.stop_all()
    assert not any(pid_alive(p) for p in pids)
    assert worker_pids(str(run_dir)) == []
    time.sleep(1.0)
    assert {k: (v["state"], v["restarts"]) for k, v in sup.status().items()} == {
        "a": ("stopped", 0), "b": ("stopped", 0)}
    assert sup.client("a") is None


def test_starting_a_running_key_replaces_its_worker(sup, app_dir):
    """Re-starting an app (new version unpacked) must not leave the old process behind."""
    first = sup.start("digits", app_dir)
    old = sup.status()["digits"]["pid"]
    client = sup.start("digits", app_dir)
    assert not pid_alive(old) and sup.status()["digits"]["pid"] != old
    assert client is first  # whoever holds the client keeps working
    assert client.ping()["pid"] == sup.status()["digits"]["pid"]
    assert sup.status()["digits"]["restarts"] == 0


def test_wrong_authkey_is_refused(sup, app_dir):
    """The pickle protocol must only be spoken with the supervisor's own clients."""
    client = sup.start("digits", app_dir)
    with pytest.raises(WorkerUnavailable, match="authentication"):
        WorkerClient(client.socket_path, authkey=b"wrong key").ping()
    with pytest.raises(WorkerUnavailable):
        WorkerClient(client.socket_path).ping()
    assert client.ping()["ok"]


def test_sigterm_is_a_clean_exit(run_dir, app_dir):
    """systemd and the supervisor stop workers with SIGTERM; that must be exit 0, socket gone."""
    sock = run_dir / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_node.worker", "--app-dir", str(app_dir),
         "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("READY ") and json.loads(line[6:])["pid"] == proc.pid
        assert WorkerClient(sock).ping()["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


def test_workers_die_with_the_agent(run_dir, app_dir):
    """If the agent is killed outright, its workers must not linger holding cores."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edge_node.worker.supervisor import WorkerSupervisor
        sup = WorkerSupervisor(Path({str(run_dir)!r}))
        sup.start("digits", Path({str(app_dir)!r}))
        print(sup.status()["digits"]["pid"], flush=True)
        time.sleep(60)
    """)
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        worker = int(agent.stdout.readline())
        assert pid_alive(worker)
        agent.kill()
        agent.wait()
        wait_for(lambda: not pid_alive(worker), timeout=10, what="orphaned worker to exit")
    finally:
        agent.kill()
        agent.wait()
