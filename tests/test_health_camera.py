"""camera: a stream whose source stops delivering frames is a ``camera_lost`` episode
(detected -> healed when frames flow again); a source that is gone is left to the
stream's own reconnect loop, a stuck capture process (SIGSTOPped) is killed and
started again by the remedy, before the stream's own watchdog would -- real capture
processes reading a real video file (made to disappear by renaming it), nothing
faked."""

from __future__ import annotations

import os
import signal
import time

import pytest

from edge_node.health import FaultJournal, Monitor
from edge_node.health.camera import CameraCheck
from edge_node.streams import StreamConfig, StreamManager
from tests.streams_support import frame_index, index_frame, wait_for, write_video

FAST = {"backoff_min": 0.2, "backoff_max": 1.0, "open_timeout": 2.0, "stall_timeout": 1.0}


def monitor_of(check):
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    mon = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                  events.append((type, data or {})))
    return mon, events, journal


@pytest.fixture
def camera(tmp_path):
    """A looping video file as the camera, read by a real capture process at 10 fps."""
    video = write_video(tmp_path / "cam.avi", [index_frame(i) for i in range(20)], 20)
    mgr = StreamManager(lambda app, f: {"i": frame_index(f)}, tick=0.1)
    mgr.start([StreamConfig(id="cam", url=str(video), app="a", fps=10, loop=True, **FAST)])
    wait_for(lambda: mgr.stats()["cam"]["processed"] >= 5, 20, "frames")
    yield mgr, video
    mgr.stop()


def test_a_camera_that_disappears_is_one_episode_healed_when_its_frames_flow_again(camera,
                                                                                    tmp_path):
    mgr, video = camera
    check = CameraCheck(mgr, lost_after_s=1.5)
    mon, events, journal = monitor_of(check)
    [f] = mon.run_all(heal=True)
    assert f.ok and f.data["flowing"] == ["cam"]
    pid = mgr.stats()["cam"]["pid"]

    away = video.rename(tmp_path / "away.avi")  # the camera is gone: reopening fails
    wait_for(lambda: not check.probe().ok, 20, "camera_lost")
    [f] = mon.run_all(heal=True)
    assert not f.ok
    assert [t for t, _ in events] == ["fault_detected", "fault_unhealed"], events
    det = events[0][1]
    assert det["fault"] == "camera_lost" and det["data"]["streams"]["cam"]["stuck"] is False
    why = events[1][1]["why"]
    assert "the source delivers nothing (offline" in why and "reconnects by itself" in why, why
    s = mgr.stats()["cam"]
    # its own reconnect loop is at work; the check restarted nothing
    assert s["open_failures"] >= 1 and s["restarts"] == 0 and s["pid"] == pid

    away.rename(video)  # back
    wait_for(lambda: mon.run_all(heal=True)[0].ok, 20, "frames again")
    assert [t for t, _ in events] == ["fault_detected", "fault_unhealed", "fault_healed"]
    assert events[-1][1]["remedy"] == "recovered by itself"
    wait_for(lambda: mgr.stats()["cam"]["state"] == "online", 5, "online")
    assert journal.summary()["camera_lost"]["healed"] == 1


def test_a_stuck_capture_process_is_restarted_and_the_frames_flow_again(camera):
    mgr, _ = camera
    # stuck after max(open_timeout + 2, stall_timeout) + 2 = 6 s without a heartbeat;
    # the stream's own watchdog waits 14 s
    check = CameraCheck(mgr, lost_after_s=7.0, heal_wait_s=15)
    mon, events, journal = monitor_of(check)
    assert mon.run_all(heal=True)[0].ok
    before = mgr.stats()["cam"]
    pid = before["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive, reads nothing, beats no more
    try:
        t0 = time.monotonic()
        wait_for(lambda: not check.probe().ok, 20, "camera_lost")
        [f] = mon.run_all(heal=True)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # gone already when the remedy worked
        except ProcessLookupError:
            pass
    assert f.ok, f.detail
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"], events
    det = events[0][1]["data"]["streams"]["cam"]
    assert det["stuck"] is True and "is hung: no heartbeat for" in det["why"], det
    remedy = events[1][1]["remedy"]
    assert "restarted the capture process and reader of cam" in remedy, remedy
    assert "frames flow again: cam" in remedy
    s = mgr.stats()["cam"]
    assert s["pid"] not in (None, pid) and s["restarts"] == 1 and s["watchdog_kills"] == 0
    wait_for(lambda: mgr.stats()["cam"]["processed"] >= s["processed"] + 5, 10, "new frames")
    wait_for(lambda: mgr.stats()["cam"]["state"] == "online", 5, "online")
    assert took < 14, took  # before the stream's own watchdog
    assert check.stats["restarts"] == 1
    assert journal.summary()["camera_lost"]["healed"] == 1


def test_stopped_and_ended_streams_are_not_judged(tmp_path):
    video = write_video(tmp_path / "short.avi", [index_frame(i) for i in range(5)], 20)
    mgr = StreamManager(lambda app, f: None, tick=0.1)
    mgr.start([StreamConfig(id="once", url=str(video), app="a", fps=20, **FAST)])
    try:
        wait_for(lambda: mgr.stats()["once"]["state"] == "ended", 20, "ended")
        check = CameraCheck(mgr, lost_after_s=0.01)
        time.sleep(0.05)
        f = check.probe()
        assert f.ok and f.data["flowing"] == [], f.detail
    finally:
        mgr.stop()
    assert CameraCheck(mgr, lost_after_s=0.01).probe().ok  # stopped: not judged


def test_a_running_agent_journals_a_lost_camera_and_its_return(tmp_path, shared_broker, prefix):
    """A real agent with a camera stream (a looping video file, no app: frames are still
    received and counted): the file goes, the episode's events go through the outbox;
    it comes back, the episode closes."""
    from tests.test_health_agent import check_of, events, make_agent

    video = write_video(tmp_path / "cam.avi", [index_frame(i) for i in range(20)], 20)
    agent = make_agent(tmp_path, shared_broker, prefix, streams=[
        {"id": "door", "url": str(video), "app": "a", "fps": 10, "loop": True, **FAST}])
    check = check_of(agent, "camera")
    check.interval_s, check.lost_after_s = 0.3, 1.5
    agent.start()
    try:
        db = agent.cfg.data_dir / "node.db"
        wait_for(lambda: agent.streams.stats()["door"]["received"] >= 5, 20, "frames")

        def faults() -> list[dict]:
            return [e for e in events(db) if e["type"].startswith("fault_")
                    and e["data"].get("fault") == "camera_lost"]

        away = video.rename(tmp_path / "away.avi")
        wait_for(lambda: len(faults()) >= 2, 20, "camera_lost")
        assert [e["type"] for e in faults()] == ["fault_detected", "fault_unhealed"]
        assert "door: no frame for" in faults()[0]["data"]["detail"]
        assert agent.health.open_faults()["camera"]["fault"] == "camera_lost"
        away.rename(video)
        wait_for(lambda: len(faults()) >= 3, 20, "healed")
        assert faults()[2]["type"] == "fault_healed"
        assert faults()[2]["data"]["remedy"] == "recovered by itself"
        assert "camera" not in agent.health.open_faults()
    finally:
        agent.stop()
