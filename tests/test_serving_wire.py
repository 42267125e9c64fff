"""The worker socket's frames: tensors of every dtype survive, bad bytes are refused."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from edge_node.worker import wire


def roundtrip(msg):
    parts = wire.encode(msg)
    frame = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in parts))
    return wire.decode(frame)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "uint8", "int16",
                                   "int32", "int64", "uint64", "bool"])
def test_every_numeric_dtype_and_shape_round_trips(dtype):
    """What a model takes or gives must come back bit for bit, writable, aligned."""
    rng = np.random.default_rng(1)
    for shape in [(1, 5), (3,), (0, 4), (), (2, 3, 7)]:
        a = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
        for _ in range(2):  # second time through the cached path
            got = roundtrip({"op": "infer", "inputs": {"x": a, "y": a[..., None]},
                             "outputs": ["o"]})
            assert got["outputs"] == ["o"]
            for name, want in (("x", a), ("y", a[..., None])):
                b = got["inputs"][name]
                assert b.dtype == want.dtype and b.shape == want.shape
                assert np.array_equal(b, want)
                assert b.flags.writeable and b.ctypes.data % 8 == 0
            rep = roundtrip({"ok": True, "outputs": {"z": a}})
            assert np.array_equal(rep["outputs"]["z"], a)


def test_non_contiguous_strings_bytes_and_plain_json():
    """Views, string tensors, images and result dicts travel too."""
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    got = roundtrip({"op": "infer", "inputs": {"a": a, "s": np.array(["ä", "b"])},
                     "outputs": None})
    assert np.array_equal(got["inputs"]["a"], a)
    assert got["inputs"]["s"].tolist() == ["ä", "b"]
    got = roundtrip({"ok": True, "result": {"score": np.float32(0.5), "top_k": [1, 2]},
                     "input": np.ones((1, 2), np.float32)})
    assert got["result"] == {"score": 0.5, "top_k": [1, 2]}
    assert roundtrip({"op": "classify", "image": b"\x89PNG\0"}) == {
        "op": "classify", "image": b"\x89PNG\0"}
    assert roundtrip("not a dict") == "not a dict"


def test_the_cache_never_mixes_up_shapes():
    """Same names, different shapes or output lists: each decodes as sent."""
    for n in (1, 2, 1, 3, 2):
        a = np.full((n, 4), n, np.float32)
        got = roundtrip({"op": "infer", "inputs": {"x": a}, "outputs": ["a"] * n})
        assert got["inputs"]["x"].shape == (n, 4) and got["outputs"] == ["a"] * n


def test_broken_frames_raise_frame_error():
    """A garbled stream is an error, never a crash or a wrong tensor."""
    good = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in wire.encode(
        {"ok": True, "outputs": {"z": np.arange(4.0)}})))
    with pytest.raises(wire.FrameError):
        wire.decode(good[:-8])
    bad = bytearray(good)
    bad[8] = ord("!")
    with pytest.raises(wire.FrameError):
        wire.decode(bad)
    with pytest.raises(wire.FrameError):
        wire.frame_length(b"\xff\xff\xff\xff\xff\xff\xff\x7f")


@pytest.mark.parametrize("server_key, client_key, ok", [
    (None, None, True), (b"k" * 32, b"k" * 32, True), (b"k" * 32, b"x" * 32, False),
    (b"k" * 32, None, False), (None, b"k" * 32, False)])
def test_handshake_needs_the_same_key_on_both_sides(server_key, client_key, ok):
    """Only the supervisor's own clients may talk to a worker, and only to the real one."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    errors = []

    def server():
        try:
            wire.server_handshake(b, server_key)
        except Exception as err:
            errors.append(err)
        finally:
            if errors:
                b.close()

    t = threading.Thread(target=server)
    t.start()
    if ok:
        wire.client_handshake(a, client_key)
    else:
        with pytest.raises(PermissionError):
            wire.client_handshake(a, client_key)
    t.join()
    a.close()
    b.close()


def test_a_worker_runs_no_more_sessions_at_once_than_its_cores_hold():
    """N callers on a 1-thread session use the worker's cores, never oversubscribe them."""
    import os

    import onnxruntime as ort

    from edge_node.worker.handler import run_slots
    from tests.models import _sample_dir

    cores = len(os.sched_getaffinity(0))
    for threads, want in ((1, cores), (cores, 1), (0, 1)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(_sample_dir() / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        assert run_slots(sess) == want
