"""Dynamic batching in the node's HTTP front, over a real worker process.

The digits app is served with batching on (as a GPU slice or ``batching.cpu``
would give it); concurrent callers' requests are joined into worker calls and
every caller gets exactly its own rows back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cloud_sync.manifest import Batching
from edge_node.serving.batching import BatchOverride, BatchPolicy, policy_for
from edge_node.serving.registry import AppRegistry
from edge_node.worker.supervisor import WorkerSupervisor
from tests.models import build_digits_app_dir, load_test_split
from tests.test_serving_http import call, conn, infer_body, served_app, start_server

CALLERS, PER_CALLER = 8, 25


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    app_dir = build_digits_app_dir(tmp_path_factory.mktemp("digits"))
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-sb-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    client = sup.start("digits", app_dir, threads=1)
    registry = AppRegistry(result_callback=None)
    # a long delay so joined calls are certain even on a busy machine
    registry.add(served_app(app_dir, client, batch=BatchPolicy(16, 0.02, 1)))
    server = start_server(registry)
    x, _ = load_test_split(app_dir)
    sess = ort.InferenceSession(str(app_dir / "model.onnx"))
    yield server, x.astype(np.float32), sess, app_dir, sup
    server.shutdown()
    sup.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)


def _probs(body: bytes) -> np.ndarray:
    out = json.loads(body)
    p = next(o for o in out["outputs"] if o["name"] == "probabilities")
    return np.asarray(p["data"], np.float32).reshape(p["shape"])


def test_concurrent_requests_are_joined_and_each_caller_gets_its_own_rows(batched):
    server, x, sess, _, _ = batched
    errors, got = [], {}

    def caller(k: int) -> None:
        c = conn(server.server_port)
        for i in range(PER_CALLER):
            j = (k * PER_CALLER + i) % len(x)
            rows = 1 + (j % 3)  # requests of 1, 2 and 3 rows share calls
            status, body, _ = call(c, "POST", "/v2/models/digits/infer",
                                   infer_body(x[j:j + rows]))
            if status != 200:
                errors.append((status, body))
            else:
                got[(k, i)] = (j, rows, _probs(body))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(got) == CALLERS * PER_CALLER
    for j, rows, probs in got.values():
        want = sess.run(["probabilities"], {"input": x[j:j + rows]})[0]
        assert probs.shape == (rows, 10)
        np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    stats = server.batching_stats()["digits"]
    assert stats["requests"] == CALLERS * PER_CALLER
    assert stats["joined"] > 0 and stats["calls"] < stats["requests"]
    assert stats["largest"] <= 16 and stats["queued"] == 0 and stats["in_flight"] == 0


def test_a_bad_request_in_a_batch_fails_alone(batched):
    """Bad rows (wrong width) never join good ones; bad ones joined together are
    retried alone, so each caller gets its own 400 and the good ones their 200."""
    server, x, _, _, _ = batched
    results: dict[str, list[int]] = {"good": [], "bad": []}
    lock = threading.Lock()

    def caller(kind: str, k: int) -> None:
        c = conn(server.server_port)
        for i in range(10):
            arr = x[k:k + 1] if kind == "good" else np.zeros((1, 63), np.float32)
            status, body, _ = call(c, "POST", "/v2/models/digits/infer", infer_body(arr))
            if kind == "bad":
                assert "error" in json.loads(body)
            with lock:
                results[kind].append(status)

    before = server.batching_stats()["digits"].get("split_retries", 0)
    threads = [threading.Thread(target=caller, args=(kind, k))
               for k in range(3) for kind in ("good", "bad")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["good"] == [200] * 30
    assert results["bad"] == [400] * 30
    assert server.batching_stats()["digits"]["split_retries"] >= before


def test_a_model_whose_output_is_not_the_batch_turns_batching_off(tmp_path):
    """A model that reduces over its first dimension cannot be split back: the
    batcher notices on the first joined call, answers everyone right, and stops."""
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])
    out = helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    model = helper.make_model(helper.make_graph([node], "sum", [inp], [out], [axes]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    app = tmp_path / "app"
    app.mkdir()
    onnx.save(model, app / "model.onnx")
    (app / "manifest.json").write_text(json.dumps({
        "name": "summer", "version": "1.0.0",
        "model": {"inputs": [{"name": "input", "shape": [None, 4]}],
                  "outputs": [{"name": "total", "shape": [1, 4]}]},
        "batching": {"max_batch": 8, "cpu": True}}))
    (app / "labels.txt").write_text("")
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-sb-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir)
    try:
        client = sup.start("summer", app)
        registry = AppRegistry(result_callback=None)
        sa = served_app(app, client)
        sa.batch = policy_for(sa.manifest.batching, "cpu")
        registry.add(sa)
        server = start_server(registry)
        try:
            got, errors = [], []

            def caller(k: int) -> None:
                c = conn(server.server_port)
                for i in range(10):
                    v = float(k * 100 + i)
                    status, body, _ = call(c, "POST", "/v2/models/summer/infer",
                                           infer_body(np.full((1, 4), v, np.float32)))
                    if status != 200:
                        errors.append(body)
                        continue
                    data = json.loads(body)["outputs"][0]["data"]
                    got.append(data == [v] * 4)

            threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors and len(got) == 60 and all(got)
            stats = server.batching_stats()["summer"]
            assert stats["requests"] == 60
            if stats["joined"]:  # a join happened (almost always): it was noticed
                assert stats["disabled"] == 1 and not server.batching_stats()["summer"]["enabled"]
        finally:
            server.shutdown()
    finally:
        sup.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_policy_off_on_cpu_by_default_on_for_gpu_and_overridable():
    on_gpu = Batching(max_batch=8)
    assert policy_for(on_gpu, "cpu") is None  # off by default on CPU
    assert policy_for(on_gpu, "gpu") == BatchPolicy(8, 0.002, 1)
    assert policy_for(Batching(), "gpu") is None  # max_batch 1: the model does not batch
    assert policy_for(Batching(max_batch=8, cpu=True), "cpu") is not None
    assert policy_for(on_gpu, "cpu", BatchOverride(enabled=True, max_delay_ms=5)) == \
        BatchPolicy(8, 0.005, 1)
    assert policy_for(on_gpu, "gpu", BatchOverride(enabled=False)) is None
    assert policy_for(Batching(), "cpu", BatchOverride(enabled=True, max_batch=4)).max_batch == 4
