"""Alarms: rules on camera results, alarms people handle, false alarms back as samples.

The N-of-M engine is pure and tested as such. The rest runs on a real node: a
capture process looping a video of one digit, the real digits worker, SQLite,
Mosquitto and the AppStore, driven over HTTP as a technician would.
"""

from __future__ import annotations

import json
import re
import time

import cv2
import numpy as np
import pytest

from edge_node.alarms import Engine, matches
from edge_node.config import AlarmRule, load_config
from edge_node.errors import ConfigError
from edge_node.streams.adapters import LocalClassifier
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.streams_support import digit_frame, write_video
from tests.test_e2e import API, http, jget, loop  # noqa: F401
from tests.test_hard_examples import _serve_digits
from tests.test_streams_hard_examples import video_frames
from tests.test_ui_labelling import browser  # noqa: F401


def rule(**kw) -> AlarmRule:
    base = {"name": "seven", "app": "digits", "labels": ["7"], "min_score": 0.8, "n": 3,
            "m": 5, "clear_after_s": 30}
    return AlarmRule(**{**base, **kw})


SEVEN, ONE, WEAK = ({"label": "7", "score": 0.95}, {"label": "1", "score": 0.99},
                    {"label": "7", "score": 0.5})


def feed(engine: Engine, results, stream: str = "gate-1", t0: float = 1000.0):
    """Feed results 0.1 s apart; every (what, alarm id) the engine answered."""
    out = []
    for i, r in enumerate(results):
        out += [(what, a.alarm_id) for what, _, a in
                engine.observe(stream, "digits", r, t0 + i * 0.1)]
    return out


# -- the engine (pure) ------------------------------------------------------------

def test_a_rule_raises_when_n_of_the_last_m_frames_match():
    """3 of the last 5: a label below min_score or another label does not count, and
    matches that fell out of the window do not either."""
    assert matches(rule(), SEVEN) and not matches(rule(), WEAK) and not matches(rule(), ONE)
    assert not matches(rule(), {"score": 0.9}) and not matches(rule(), {"label": "7"})
    e = Engine([rule()])
    # hit, miss, miss, miss, hit, miss, hit: the last five hold two hits
    assert feed(e, [SEVEN, ONE, WEAK, ONE, SEVEN, ONE, SEVEN]) == []
    assert [w for w, _ in feed(e, [SEVEN], t0=2000)] == ["raised"]  # now 3 of 5
    alarm = next(iter(e.active.values()))
    assert (alarm.label, alarm.score, alarm.frames, alarm.stream) == ("7", 0.95, 3, "gate-1")


def test_one_alarm_per_rule_and_stream_no_storm():
    """A camera that keeps seeing the label keeps one alarm: later frames only count
    and move last_seen; another stream of the same app has its own alarm; a rule
    bound to one stream ignores the others; results of other apps are not looked at."""
    bound = rule(name="gate-only", stream="gate-1")
    e = Engine([rule(), bound])
    got = feed(e, [SEVEN] * 50)
    raised = [a for w, a in got if w == "raised"]
    assert len(raised) == 2  # one per rule
    assert sum(w == "seen" for w, _ in got) == 2 * 47
    alarm = e.active[("seven", "gate-1")]
    assert alarm.frames == 50 and alarm.last_seen == pytest.approx(1000 + 4.9)
    assert [w for w, _ in feed(e, [SEVEN] * 3, stream="gate-2")] == ["raised"]
    assert set(e.active) == {("seven", "gate-1"), ("gate-only", "gate-1"), ("seven", "gate-2")}
    assert e.observe("gate-1", "other-app", SEVEN, 1.0) == [] and not e.watches("other-app")


def test_an_alarm_clears_after_quiet_time_unless_latched():
    """No matching frame for clear_after_s: cleared (and a new alarm needs N matches
    again); a latched rule's alarm stays until someone ends it."""
    e = Engine([rule(clear_after_s=10), rule(name="latched", latch=True)])
    feed(e, [SEVEN] * 3)
    last = 1000.2
    assert e.expire(last + 9.9) == []
    cleared = e.expire(last + 10.0)
    assert [a.rule for a in cleared] == ["seven"] and set(e.active) == {("latched", "gate-1")}
    assert e.expire(last + 10_000) == []  # latched: still active
    assert [w for w, _ in feed(e, [SEVEN], t0=1020)] == ["raised", "seen"]  # window still full
    latched = e.active[("latched", "gate-1")]
    assert e.end(latched.alarm_id, 1030.0) is latched and ("latched", "gate-1") not in e.active
    assert e.end("nope", 1030.0) is None


def test_cooldown_keeps_a_handled_alarm_from_coming_straight_back():
    """After an alarm ends, the same rule and stream stay quiet for cooldown_s, then
    may raise again."""
    e = Engine([rule(cooldown_s=60)])
    (_, first), = feed(e, [SEVEN] * 3)[-1:]
    e.end(first, 1000.3)
    assert feed(e, [SEVEN] * 10, t0=1001) == []
    assert [w for w, _ in feed(e, [SEVEN], t0=1061)] == ["raised"]


def test_alarm_rules_are_checked_in_the_node_config(tmp_path):
    """Bad rules stop the node with the key path: n > m, duplicate names, a stream
    that does not exist or feeds another app, an unknown key."""
    def bad(rules, streams=()):
        with pytest.raises(ConfigError) as err:
            load_config(node_id="n", data_dir=tmp_path, streams=list(streams),
                        alarms={"rules": rules})
        return str(err.value)

    r = {"name": "a", "app": "digits", "labels": ["7"]}
    assert "n (6) cannot be more than m (5)" in bad([{**r, "n": 6, "m": 5}])
    assert "unique" in bad([r, r])
    assert "alarms.rules.0.stream = 'cam'" in bad([{**r, "stream": "cam"}])
    cam = {"id": "cam", "url": "/dev/null", "app": "other"}
    assert "feeds app 'other'" in bad([{**r, "stream": "cam"}], [cam])
    assert "alarms.rules.0.colour" in bad([{**r, "colour": "red"}])
    ok = load_config(node_id="n", data_dir=tmp_path, streams=[{**cam, "app": "digits"}],
                     alarms={"rules": [{**r, "stream": "cam"}]})
    assert ok.alarms.rules[0].n == 3 and ok.alarms.rules[0].severity == "warning"


# -- on a real node ------------------------------------------------------------------

def seven_video(digits, path, n: int = 10, fps: float = 10):
    """A video of one clear 7 (the model is sure of it, as the camera decodes it)."""
    with np.load(digits / "heldout.npz") as z:
        X, y = z["X_test"], z["y_test"]
    clf = LocalClassifier({"digits": digits})
    for i in np.flatnonzero(y == 7):
        video = write_video(path, [digit_frame(X[i])] * n, fps)
        if all(clf("digits", f)["score"] > 0.98 for f in video_frames(video)):
            return video
    raise AssertionError("no clear 7")


def post(url: str, body) -> tuple[int, dict]:
    status, raw = http("POST", url, body)
    return status, json.loads(raw)


def events(store, type: str) -> list[dict]:
    return jget(f"{store.url}{API}/events?node=site-1&type={type}")["events"]


def metric(text: str, name: str, rule_name: str) -> float | None:
    m = re.search(rf'^{name}{{rule="{rule_name}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_an_alarm_is_raised_once_handled_and_a_false_alarm_becomes_a_sample(
        loop, digits_dir, tmp_path):  # noqa: F811
    """The mine-site loop: a camera sees a 7 frame after frame; one alarm is raised
    with the frame as evidence; a technician acknowledges it and marks it false with
    the correct class; that frame becomes a labelled sample (label_source
    false_alarm) in the labelling data and the cloud hears of every step. Wrong
    requests are refused with why: 404, 400, 409 with the current state."""
    video = seven_video(digits_dir, tmp_path / "seven.avi")
    decoded = video_frames(video)
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path, streams=[
        {"id": "gate-1", "url": str(video), "app": "digits", "fps": 10, "loop": True}],
        alarms={"rules": [{"name": "person-in-zone", "app": "digits", "stream": "gate-1",
                           "labels": ["7"], "min_score": 0.8, "n": 3, "m": 5,
                           "severity": "warning", "clear_after_s": 30, "cooldown_s": 600}]})
    edge = f"{agent.http_url}{API}/alarms"
    (alarm,) = wait_until(lambda: jget(f"{edge}?state=open")["alarms"], timeout=30)
    aid = alarm["alarm_id"]
    assert (alarm["rule"], alarm["stream"], alarm["app"], alarm["label"], alarm["severity"]) \
        == ("person-in-zone", "gate-1", "digits", "7", "warning")
    assert alarm["score"] >= 0.8 and alarm["result"]["label"] == "7"
    # the camera keeps seeing it: still one alarm, its frames counted
    wait_until(lambda: jget(f"{edge}/{aid}")["frames"] >= alarm["frames"] + 10, timeout=15)
    assert len(jget(edge)["alarms"]) == 1 and agent.alarms.stats()["raised"] == {
        "person-in-zone": 1}
    status, png = http("GET", f"{edge}/{aid}/evidence")
    assert status == 200 and png.startswith(b"\x89PNG")
    evidence = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert any(np.array_equal(evidence, f) for f in decoded)

    assert post(f"{edge}/nope/ack", {"by": "tech-1"})[0] == 404
    status, body = post(f"{edge}/{aid}/ack", {"who": "tech-1"})
    assert status == 400 and body["error"] == "bad_request"
    status, body = post(f"{edge}/{aid}/ack", {"by": "tech-1"})
    assert status == 200 and body["state"] == "acknowledged"
    assert body["acknowledged_by"] == "tech-1" and body["acknowledged_at"]
    status, body = post(f"{edge}/{aid}/ack", {"by": "tech-2"})
    assert status == 409 and body["state"] == "acknowledged" and body["error"] == "bad_transition"
    status, body = post(f"{edge}/{aid}/false-alarm", {"by": "tech-1", "label": "seven"})
    assert status == 400 and body["error"] == "unknown_label" and "1" in body["detail"]["classes"]
    status, body = post(f"{edge}/{aid}/false-alarm", {"by": "tech-1", "label": "7"})
    assert status == 400 and body["error"] == "bad_label"
    status, body = post(f"{edge}/{aid}/false-alarm", {"by": "tech-1", "label": "1"})
    assert status == 200 and body["state"] == "false_alarm", body
    assert body["closed_by"] == "tech-1" and body["correct_label"] == "1" and body["sample_id"]
    assert [h["state"] for h in body["history"]] == ["open", "acknowledged", "false_alarm"]
    status, body = post(f"{edge}/{aid}/resolve", {"by": "tech-1", "note": "done"})
    assert status == 409 and body["state"] == "false_alarm"

    sample = jget(f"{agent.http_url}{API}/samples/{jget(f'{edge}/{aid}')['sample_id']}")
    assert (sample["label"], sample["label_source"], sample["labelled_by"], sample["source"]) \
        == ("1", "false_alarm", "tech-1", "gate-1")
    assert sample["input_type"] == "image/png" and sample["reason"] == "false_alarm"
    status, kept = http("GET", f"{agent.http_url}{sample['input_url']}")
    assert status == 200 and kept == png  # the evidence frame itself
    time.sleep(1.0)  # the camera still sees the 7: the cooldown keeps a new alarm back
    assert [a["alarm_id"] for a in jget(edge)["alarms"]] == [aid]

    for type in ("alarm_raised", "alarm_acknowledged", "alarm_false"):
        (ev,) = wait_until(lambda t=type: events(store, t), timeout=20)
        assert ev["data"]["alarm_id"] == aid and ev["data"]["rule"] == "person-in-zone"
        assert ev["data"]["stream"] == "gate-1" and ev["app"] == "digits"
        assert ev["data"]["label"] == "7" and ev["data"]["score"] >= 0.8
    assert events(store, "alarm_raised")[0]["severity"] == "warning"
    assert events(store, "alarm_false")[0]["data"]["by"] == "tech-1"
    assert events(store, "alarm_false")[0]["data"]["sample_id"] == sample["sample_id"]
    assert events(store, "alarm_false")[0]["data"]["label_from"] == "technician"
    text = http("GET", f"{agent.http_url}/metrics")[1].decode()
    assert metric(text, "aidc_alarms_raised_total", "person-in-zone") == 1.0
    assert metric(text, "aidc_alarms_false_total", "person-in-zone") == 1.0
    assert metric(text, "aidc_alarms_open", "person-in-zone") == 0.0


def test_a_quiet_camera_clears_its_alarm_a_latched_one_waits_for_a_person(
        loop, digits_dir, tmp_path):  # noqa: F811
    """When the camera stops seeing the label, an ordinary alarm clears itself (and
    can still be called false: its frame then waits unlabelled at the top of the
    labelling queue); a latched one stays open until handled, and its rule's
    background class labels the frame of a false alarm."""
    video = seven_video(digits_dir, tmp_path / "seven.avi")
    store, node = loop
    common = {"app": "digits", "labels": ["7"], "min_score": 0.8, "n": 2, "m": 3}
    agent = _serve_digits(store, node, digits_dir, tmp_path, streams=[
        {"id": "gate-1", "url": str(video), "app": "digits", "fps": 10, "loop": True}],
        alarms={"rules": [{**common, "name": "passing", "clear_after_s": 1.0},
                          {**common, "name": "latched", "latch": True, "clear_after_s": 1.0,
                           "false_alarm_label": "0", "severity": "critical"}]})
    edge = f"{agent.http_url}{API}/alarms"
    wait_until(lambda: len(jget(f"{edge}?state=open")["alarms"]) == 2, timeout=30)
    agent.streams.remove("gate-1")  # the camera goes away
    (cleared,) = wait_until(lambda: jget(f"{edge}?state=cleared")["alarms"], timeout=10)
    assert cleared["rule"] == "passing" and cleared["closed_at"] >= cleared["last_seen"]
    time.sleep(1.5)
    (latched,) = jget(f"{edge}?state=active")["alarms"]
    assert latched["rule"] == "latched" and latched["state"] == "open"
    assert jget(edge)["counts"] == {"cleared": 1, "open": 1}
    assert post(f"{edge}/{cleared['alarm_id']}/ack", {"by": "t"})[1]["state"] == "cleared"

    status, body = post(f"{edge}/{cleared['alarm_id']}/false-alarm", {"by": "t"})
    assert status == 200 and body["correct_label"] is None
    top = jget(f"{agent.http_url}{API}/labelling/queue?app=digits")["queue"][0]
    assert top["sample_id"] == body["sample_id"] and top["usefulness"] == 1.0
    assert top["label"] is None and top["reason"] == "false_alarm"

    status, body = post(f"{edge}/{latched['alarm_id']}/false-alarm", {"by": "t"})
    assert status == 200 and body["correct_label"] == "0"
    sample = jget(f"{agent.http_url}{API}/samples/{body['sample_id']}")
    assert (sample["label"], sample["label_source"]) == ("0", "false_alarm")
    (ev,) = wait_until(lambda: events(store, "alarm_cleared"), timeout=20)
    assert ev["data"]["rule"] == "passing" and ev["data"]["by"] is None
    raised = wait_until(lambda: len(events(store, "alarm_raised")) == 2
                        and events(store, "alarm_raised"), timeout=20)
    assert {e["severity"] for e in raised} == {"warning", "critical"}
    falses = wait_until(lambda: len(events(store, "alarm_false")) == 2
                        and events(store, "alarm_false"), timeout=20)
    assert {e["data"]["rule"]: e["data"]["label_from"] for e in falses} == {
        "passing": None, "latched": "rule"}


# -- the service on real SQLite, without a camera ---------------------------------------

def test_evidence_comes_from_the_next_frame_and_alarms_survive_a_restart(tmp_path):
    """A raising frame overwritten before the copy: the alarm is raised anyway and the
    next matching frame is its evidence. After a restart the open alarm is still the
    one alarm of its rule and stream (no second one raised), and it still clears."""
    from edge_node.alarms import Alarms
    from edge_node.capture import Capture
    from edge_node.config import AlarmsConfig, FeedbackConfig
    from edge_node.store import NodeStore

    store = NodeStore(tmp_path / "node.db")
    capture = Capture(store, None, "unused", tmp_path / "samples", FeedbackConfig(upload="none"))
    sent: list[tuple[str, dict]] = []
    cfg = AlarmsConfig(rules=[rule(clear_after_s=2.0)])

    def service() -> Alarms:
        a = Alarms(cfg, store, capture, lambda app, n: [str(i) for i in range(10)],
                   lambda type, **kw: sent.append((type, kw["data"])), tmp_path / "alarms")
        a.start()
        return a

    pixels = np.full((24, 32, 3), 77, np.uint8)
    alarms = service()
    now = time.time()
    for i in range(3):
        alarms.observe("gate-1", "digits", "1.0.0", SEVEN, now + i * 0.1, lambda: None)
    (row,) = wait_until(lambda: store.query_alarms(), timeout=5)
    assert row["evidence_path"] is None and alarms.stats()["evidence_gone"] == 1
    alarms.observe("gate-1", "digits", "1.0.0", SEVEN, now + 0.3, lambda: pixels)
    wait_until(lambda: store.get_alarm(row["alarm_id"])["evidence_path"], timeout=5)
    png = alarms.evidence(row["alarm_id"])
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED),
                          pixels)
    alarms.stop()

    alarms = service()  # the agent restarted
    assert alarms.stats()["open"] == {"seven": 1}
    for i in range(5):
        alarms.observe("gate-1", "digits", "1.0.0", SEVEN, time.time(), lambda: pixels)
    wait_until(lambda: store.get_alarm(row["alarm_id"])["frames"] == 4 + 5, timeout=5)
    assert [r["alarm_id"] for r in store.query_alarms()] == [row["alarm_id"]]
    wait_until(lambda: store.get_alarm(row["alarm_id"])["state"] == "cleared", timeout=10)
    alarms.stop()
    assert [t for t, _ in sent] == ["alarm_raised", "alarm_cleared"]
    store.close()


# -- the alarms page ---------------------------------------------------------------------

def test_the_alarms_page_is_served_from_the_node():
    """/ui/alarms and its script and styles come from the node (nothing from outside)."""
    from flask import Flask

    from edge_node.ui import make_ui_blueprint

    app = Flask("t")
    app.register_blueprint(make_ui_blueprint())
    c = app.test_client()
    html = c.get("/ui/alarms")
    assert html.status_code == 200 and html.mimetype == "text/html"
    refs = re.findall(r'(?:src|href)="([^"]+)"', html.get_data(as_text=True))
    assert "static/alarms.js" in refs
    for ref in refs:
        if ref.startswith("static/"):
            assert c.get(f"/ui/{ref}").status_code == 200, ref


def test_a_technician_handles_an_alarm_on_the_page(
        browser, loop, digits_dir, tmp_path):  # noqa: F811
    """In a real browser: the alarm shows with its frame; the technician acknowledges
    it, a refused action says why and what state the alarm is in, and calling it
    false with the right class from the list makes a labelled sample."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    video = seven_video(digits_dir, tmp_path / "seven.avi")
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path, streams=[
        {"id": "gate-1", "url": str(video), "app": "digits", "fps": 10, "loop": True}],
        alarms={"rules": [{"name": "person-in-zone", "app": "digits", "labels": ["7"],
                           "min_score": 0.8, "cooldown_s": 600}]})
    edge = f"{agent.http_url}{API}/alarms"
    (alarm,) = wait_until(lambda: jget(edge)["alarms"], timeout=30)
    aid = alarm["alarm_id"]

    b = browser
    wait = WebDriverWait(b, 10)
    el = b.find_element
    b.get(f"{agent.http_url}/ui/alarms")
    row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-id="{aid}"]'))
    assert "person-in-zone" in row.text and "gate-1" in row.text and "open" in row.text
    row.click()
    wait.until(lambda d: d.execute_script(
        "return document.getElementById('evidence').naturalWidth") > 0, "the frame loads")
    el(By.ID, "ack").click()  # no name yet: the page asks for one, nothing is sent
    wait.until(lambda d: "Type your name" in el(By.ID, "msg").text)
    assert jget(f"{edge}/{aid}")["state"] == "open"
    el(By.ID, "by").send_keys("tech-ui")
    el(By.ID, "ack").click()
    wait.until(lambda d: jget(f"{edge}/{aid}")["state"] == "acknowledged")
    assert jget(f"{edge}/{aid}")["acknowledged_by"] == "tech-ui"
    wait.until(lambda d: el(By.ID, "ack").get_attribute("disabled"), "ack is done")
    # the page offers ack again (as if it had not refreshed yet): the node refuses, it says why
    b.execute_script("const b = document.getElementById('ack'); b.disabled = false; b.click();")
    wait.until(lambda d: "409" in el(By.ID, "msg").text)
    assert "it is acknowledged now" in el(By.ID, "msg").text
    Select(el(By.ID, "label")).select_by_value("1")
    el(By.ID, "false").click()
    wait.until(lambda d: "Marked false" in el(By.ID, "msg").text)
    done = jget(f"{edge}/{aid}")
    assert (done["state"], done["closed_by"], done["correct_label"]) == (
        "false_alarm", "tech-ui", "1")
    sample = jget(f"{agent.http_url}{API}/samples/{done['sample_id']}")
    assert (sample["label"], sample["label_source"]) == ("1", "false_alarm")
