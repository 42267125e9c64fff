"""Learn while using, driven by a camera: a stream of shifted digits -> hard examples
kept from its frames -> labelled through the REST API -> a fine-tune job under the
scheduler -> the gate on the held-out frames -> shadow on the camera's frames (and on
live requests) -> promoted with no failed request and no lost or failed frame ->
rolled back on command, the same; a false alarm on the camera becomes a labelled
sample; and the site's upload level ``none`` keeps every sample home.

Real parts: the edge agent, a capture process reading a video file, frames through
shared memory to the real worker processes (ONNX Runtime), the scheduler running
the fine-tune as its own process, Mosquitto, the AppStore, SQLite on disk; driven
over HTTP as a technician's tools would.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from cloud_sync.connection import MqttConnection
from cloud_sync.topics import Topics
from edge_node.adapt import Shadow
from edge_node.streams.adapters import LocalClassifier, WorkerClassifier
from edge_node.streams.proc import FrameRef
from edge_node.streams.stream import FrameCopy
from edge_node.worker.errors import WorkerError, WorkerUnavailable
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.streams_support import digit_frame, write_video
from tests.test_e2e import API, feedback, http, jget, loop, node_app  # noqa: F401
from tests.test_site_learning import ALWAYS, Load, _publish_with_gate, _run_state, blur
from tests.test_streams_hard_examples import video_frames

#: the camera's frame rate; with up to 16 frames inside the model and 32 queued, a
#: stall of more than a second (a loaded 2-core box) would still lose none
FPS = 10
#: the site's hard-example threshold: a frame the model is less sure of is kept
THRESHOLD = 0.8
#: every frame the stream's books can lose or fail, besides ``processed``
LOSSES = ("failed", "dropped_capture", "dropped_inflight", "dropped_torn", "lost",
          "unexplained", "result_errors", "torn_in_worker")


def _key(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@dataclass
class Camera:
    """A camera's video: a clear lead-in, the site's shifted digits the model doubts
    (each shown once), then clear digits for minutes with a run of clear 7s now and
    then (what the alarm rule watches for)."""

    path: Path
    n_hard: int
    truth: dict[str, int] = field(default_factory=dict)  # decoded frame -> true class

    def switch_on(self, frames: list[np.ndarray]) -> None:
        """The camera comes online: the file appears whole (the stream was retrying)."""
        tmp = self.path.with_name("partial-" + self.path.name)
        write_video(tmp, frames, FPS)
        os.replace(tmp, self.path)


def make_camera(digits: Path, tmp: Path, idle_s: float = 240.0) -> tuple[Camera, list]:
    with np.load(digits / "heldout.npz") as z:
        X, y = z["X_test"], z["y_test"]
    shifted = [digit_frame(x) for x in blur(X)]
    clear = [digit_frame(x) for x in X]
    # what the capture process will decode (MJPG is intra-only: a frame decodes the
    # same wherever it sits in a file), and what the app makes of it
    decoded = video_frames(write_video(tmp / "calibrate.avi", shifted + clear, FPS))
    clf = LocalClassifier({"digits": digits})
    res = [clf("digits", f) for f in decoded]
    n = len(X)
    hard = [i for i in range(n) if res[i]["score"] < THRESHOLD]
    sure = [i for i in range(n) if res[n + i]["score"] > 0.98 and res[n + i]["index"] == y[i]]
    calm = [i for i in sure if y[i] != 7][:40]
    sevens = [i for i in sure if y[i] == 7][:1]
    assert len(hard) >= 150 and len(calm) == 40 and sevens, (len(hard), len(calm))
    cam = Camera(tmp / "gate-1.avi", len(hard))
    for i in range(n):
        cam.truth[_key(decoded[i])] = int(y[i])
        cam.truth[_key(decoded[n + i])] = int(y[i])
    frames = [clear[calm[k % len(calm)]] for k in range(FPS)]  # 1 s lead-in
    frames += [shifted[i] for i in hard]
    for k in range(int(idle_s * FPS)):
        # a run of ten clear 7s every 10 s, from 2 s into the idle part
        if k % (10 * FPS) in range(2 * FPS, 2 * FPS + 10):
            frames.append(clear[sevens[0]])
        else:
            frames.append(clear[calm[k % len(calm)]])
    return cam, frames


class UploadTap:
    """An MQTT client on the node's feedback topic: every sample the broker carries."""

    def __init__(self, broker, prefix: str, node_id: str = "site-1") -> None:
        self.got: queue.Queue[bytes] = queue.Queue()
        self.conn = MqttConnection(f"tap-{prefix}", broker.host, broker.port)
        self.conn.subscribe(Topics(prefix=prefix).feedback(node_id),
                            lambda t, p, r: self.got.put(p))
        self.conn.start()
        assert self.conn.wait_connected(10)

    def stop(self) -> None:
        self.conn.stop()


def _books(agent) -> dict:
    return agent.streams.stats()["gate-1"]


def _losses(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in LOSSES if after[k] != before[k]}


def _frames_read(agent) -> int:
    """Frames the app's serving worker has read from the stream's shared memory."""
    key = agent.reconciler.serving("digits")["key"]
    client = agent.supervisor.client(key)
    return client.request({"op": "ping"})["frames"]["read"] if client else -1


def _switched(agent, store, variant: str | None, done_before: int) -> dict:
    """The node serves ``variant`` (reported to the cloud) and its worker has taken
    over the camera: 20 more frames processed, read by the new worker."""
    wait_until(lambda: (node_app(store) or {}).get("variant") == variant, timeout=30)
    read0 = _frames_read(agent)
    wait_until(lambda: _books(agent)["processed"] >= done_before + 20
               and _frames_read(agent) >= max(read0, 0) + 20, timeout=30)
    return _books(agent)


@pytest.mark.timeout(300)
def test_a_camera_stream_drives_the_learning_loop(loop, digits_dir, tmp_path, broker,
                                                  prefix):  # noqa: F811
    cam, frames = make_camera(digits_dir, tmp_path)
    store, node = loop
    tap = UploadTap(broker, prefix)
    agent = node(
        feedback={"threshold": THRESHOLD, "max_per_minute": 100000, "heldout_fraction": 0.3,
                  "upload": "none"},
        scheduling=ALWAYS,
        streams=[{"id": "gate-1", "url": str(cam.path), "app": "digits", "fps": FPS,
                  "max_in_flight": 16, "queue_size": 32, "backoff_min": 0.2,
                  "backoff_max": 0.5}],
        alarms={"rules": [{"name": "seven-at-gate", "app": "digits", "stream": "gate-1",
                           "labels": ["7"], "min_score": 0.95, "n": 5, "m": 5,
                           "clear_after_s": 600, "cooldown_s": 600}]})
    edge = agent.http_url
    try:
        _publish_with_gate(store, digits_dir, tmp_path, min_gain=0.05, max_regression=0.05,
                           shadow_requests=40, shadow_timeout_s=120, min_samples=50,
                           min_heldout=20)
        assert _books(agent)["processed"] == 0  # the camera is not online yet

        # 1. the camera comes online; the frames the model doubts are kept, once each
        cam.switch_on(frames)
        wait_until(lambda: _books(agent)["processed"] >= FPS + cam.n_hard + 2 * FPS,
                   timeout=60, interval=0.2)
        wait_until(lambda: agent.capture.stats["results"] >= _books(agent)["processed"] - 8,
                   timeout=20)
        kept = agent.capture.stats["samples_kept"]
        assert kept >= 0.9 * cam.n_hard, (kept, cam.n_hard, _books(agent))
        assert agent.capture.stats["samples_frame_gone"] == 0

        # 2. a technician labels them through the API (here: from the ground truth)
        labelled = 0
        while True:
            q = jget(f"{edge}{API}/labelling/queue?app=digits&limit=200")["queue"]
            if not q:
                break
            for s in q:
                assert s["source"] == "gate-1" and s["input_type"] == "image/png", s
                status, png = http("GET", f"{edge}{s['input_url']}")
                assert status == 200
                pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
                label = cam.truth[_key(pixels)]  # KeyError: not a frame the model saw
                status, body = http("PUT", f"{edge}{API}/samples/{s['sample_id']}/label",
                                    {"label": str(label), "by": "tech-1"})
                assert status == 200, body
                labelled += 1
        assert labelled == kept

        # 3. the fine-tune, through the API, as a job under the scheduler
        status, body = http("POST", f"{edge}{API}/apps/digits/finetune", {"by": "tech-1"})
        assert status == 202, body
        run_id = json.loads(body)["run_id"]
        load = Load(edge, np.load(digits_dir / "heldout.npz")["X_test"][260:], pause=0.2)
        try:
            wait_until(lambda: _run_state(agent, run_id)["state"] != "training", timeout=120,
                       interval=0.1)
            before_switch = _books(agent)  # in shadow (or just past it)
            wait_until(lambda: _run_state(agent, run_id)["state"] != "shadow", timeout=120,
                       interval=0.2)
            done = _run_state(agent, run_id)
            assert done["state"] == "promoted", done
            m = done["metrics"]
            job = next(j for j in jget(f"{edge}{API}/training")["jobs"]
                       if j["job_id"] == done["job_id"])  # the scheduler ran it
            assert job["state"] == "done" and job["name"] == "finetune-digits", job
            assert m["heldout"]["candidate"] >= m["heldout"]["base"] + 0.05, m
            assert m["heldout"]["n"] >= 20 and m["skipped"] == [], m
            # 4. the shadow compared camera frames, at a bounded rate, and requests
            sh = m["shadow"]
            assert sh["errors"] == 0 and sh["compared"] >= 40, sh
            assert sh["frames"] >= 10 and sh["requests"] >= 1, sh
            assert sh["frames"] + sh["requests"] == sh["compared"]
            assert sh["frames_skipped"]["rate"] > 0, sh  # 10 fps offered, 5 a second taken
            assert "camera frames" in done["reason"]
            # 5. the switch: the variant serves the camera; no frame lost or failed
            after_promotion = _switched(agent, store, "1.0.0+site.1",
                                        before_switch["processed"])
            assert _losses(before_switch, after_promotion) == {}

            # 6. rollback on command, while the camera and the requests go on
            before_rollback = _books(agent)
            status, body = http("POST", f"{edge}{API}/apps/digits/rollback", {"by": "ops"})
            assert status == 200 and json.loads(body)["rolled_back"] == "1.0.0+site.1", body
            after_rollback = _switched(agent, store, None, before_rollback["processed"])
            assert _losses(before_rollback, after_rollback) == {}
        finally:
            load.stop()
        assert load.failed == [], load.failed[:3]
        assert load.ok > 10
        assert _run_state(agent, run_id)["state"] == "rolled_back"

        # 7. the camera's clear 7s raised an alarm; a technician calls it false: the
        # frame becomes a labelled sample
        alarms = f"{edge}{API}/alarms"
        (alarm,) = wait_until(lambda: jget(f"{alarms}?state=open")["alarms"], timeout=30)
        status, body = http("POST", f"{alarms}/{alarm['alarm_id']}/false-alarm",
                            {"by": "tech-1", "label": "1"})
        assert status == 200, body
        sample = jget(f"{edge}{API}/samples/{json.loads(body)['sample_id']}")
        assert (sample["label"], sample["label_source"], sample["source"]) == (
            "1", "false_alarm", "gate-1")

        # 8. upload level "none": the cloud hears the events, never a sample
        wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=alarm_false")
                   ["events"], timeout=30)
        events = {e["type"] for e in
                  jget(f"{store.url}{API}/events?node=site-1&limit=1000")["events"]}
        assert {"finetune_started", "finetune_shadow", "model_promoted",
                "model_rolled_back", "alarm_raised"} <= events, events
        assert feedback(store) == []
        assert tap.got.qsize() == 0
        st = agent.capture.stats
        assert st["samples_kept_home"] >= kept and st["samples_queued"] == 0
        books = _books(agent)
    finally:
        tap.stop()
    print(f"held-out frames: served {m['heldout']['base']:.3f} -> candidate "
          f"{m['heldout']['candidate']:.3f} (n={m['heldout']['n']}); replay {m['replay']}; "
          f"hard frames kept {kept} of {cam.n_hard}; shadow: {sh['frames']} camera frames + "
          f"{sh['requests']} requests, skipped {sh['frames_skipped']}, agreement "
          f"{sh['agreement']:.2f}; frames through promotion "
          f"{after_promotion['processed'] - before_switch['processed']} and rollback "
          f"{after_rollback['processed'] - before_rollback['processed']}, losses "
          f"{_losses(before_switch, after_rollback)}; requests {load.ok}, failed "
          f"{len(load.failed)}; whole stream {({k: books[k] for k in ('processed', *LOSSES)})}")


# -- the shadow's frame path, on its own ----------------------------------------------

class Candidate:
    """A stand-in for the candidate's worker client: answers ``classify_frame`` with
    class 3, or with an error per frame seq (``fail``: seq -> status)."""

    def __init__(self, fail: dict[int, int] | None = None, delay: float = 0.0) -> None:
        self.fail, self.delay, self.asked = fail or {}, delay, []

    def request(self, msg: dict) -> dict:
        self.asked.append(msg)
        time.sleep(self.delay)
        status = self.fail.get(msg["seq"])
        if status:
            raise WorkerError(status, "no")
        return {"ok": True, "result": {"index": 3, "label": "3", "score": 0.9}}


def _ref(seq: int) -> FrameCopy:
    ref = FrameRef("aidcx_gate-1_0_1", "aidcx_gate-1", (0, 1), seq % 8, seq, (32, 32, 3))
    return FrameCopy(lambda: None, ref=ref)


def _shadow(client, want: int = 1000, fps: float = 5.0) -> tuple[Shadow, queue.Queue]:
    done: queue.Queue = queue.Queue()
    return Shadow("run", "digits", "k", client, "input", "probabilities", want, done.put,
                  timeout_s=30, frames_per_s=fps), done


def test_the_shadow_takes_camera_frames_by_reference_at_a_bounded_rate():
    """A 100-frame burst: one frame is taken (5 a second at most), the rest are skipped
    as "rate", none waits; the candidate gets only the frame's reference."""
    cand = Candidate()
    sh, _ = _shadow(cand)
    t0 = time.perf_counter()
    for seq in range(100):
        sh.offer_frame({"index": 3, "score": 0.95, "scores": [0.0] * 10}, _ref(seq))
    assert time.perf_counter() - t0 < 0.5
    wait_until(lambda: sh.summary()["compared"] == 1)
    s = sh.summary()
    assert (s["frames"], s["requests"], s["frames_skipped"]["rate"]) == (1, 0, 99)
    assert s["agreement"] == 1.0 and s["confident_agreement"] == 1.0
    (msg,) = cand.asked
    assert msg["op"] == "classify_frame" and msg["seq"] == 0 and "image" not in msg
    time.sleep(0.25)  # a fifth of a second later the next frame is taken
    sh.offer_frame({"index": 5, "score": 0.5}, _ref(100))
    wait_until(lambda: sh.summary()["compared"] == 2)
    assert sh.summary()["agreement"] == 0.5 and sh.summary()["confident"] == 1
    sh.stop()


def test_a_frame_gone_before_the_candidate_reads_it_is_skipped_a_failure_counts():
    """409 (overwritten) and 410 (ring gone) are the camera's doing: skipped and
    counted by reason. A 500 is the candidate's: an error, which rejects it."""
    sh, done = _shadow(Candidate(fail={0: 409, 1: 410, 2: 500}), want=2, fps=1000)
    for seq in range(4):
        sh.offer_frame({"index": 3, "score": 0.99}, _ref(seq))
        time.sleep(0.01)
    assert done.get(timeout=5) is sh  # an error and one compared frame make the two
    s = sh.summary()
    assert s["frames_skipped"]["overwritten"] == 1 and s["frames_skipped"]["ring_gone"] == 1
    assert (s["errors"], s["frame_errors"], s["request_errors"], s["frames"]) == (1, 1, 0, 1)


def test_a_busy_shadow_skips_frames_instead_of_holding_up_the_stream():
    sh, _ = _shadow(Candidate(delay=0.5), fps=1e6)
    t0 = time.perf_counter()
    for seq in range(200):
        sh.offer_frame({"index": 3, "score": 0.99}, _ref(seq))
    assert time.perf_counter() - t0 < 0.5
    assert sh.summary()["frames_skipped"]["busy"] >= 200 - 64 - 1
    no_frame = FrameCopy(lambda: None)  # neither a reference nor a copy to give
    sh.offer_frame({"index": 3, "score": 0.99}, no_frame)
    assert sh.summary()["frames_skipped"]["no_frame"] == 1
    sh.stop()


class _Gone:
    def request(self, msg):
        raise WorkerUnavailable("worker went away")


def test_a_frame_sent_to_a_worker_just_replaced_goes_to_the_new_one():
    """A promotion or rollback swaps the app's worker (new first, then the old one
    stops): a frame that reached for the old one is sent to the new one, not failed.
    A worker that is simply gone still fails the frame."""
    new = Candidate()
    clients = iter([_Gone(), new])  # what the registry holds at each look
    wc = WorkerClassifier(lambda app: next(clients))
    assert wc.by_ref("digits", _ref(7).ref)["index"] == 3 and len(new.asked) == 1
    gone = _Gone()
    with pytest.raises(WorkerUnavailable):
        WorkerClassifier(lambda app: gone).by_ref("digits", _ref(8).ref)
