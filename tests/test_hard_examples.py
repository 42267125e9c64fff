"""Hard examples on site: policies, the disk quota, labelling, upload levels.

The policy units are pure functions; everything else runs on real parts: the
edge agent with its worker processes and ONNX Runtime, a real Mosquitto, the
real AppStore, SQLite on disk, driven over HTTP as a technician would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edge_node.capture import is_heldout
from edge_node.hardex import Policy, judge, resolve
from tests.appstore_support import digits_dir, wait_until  # noqa: F401
from tests.models import digit_png
from tests.test_e2e import API, assign, feedback, http, jget, loop, node_app, publish  # noqa: F401


# -- policies (pure) -----------------------------------------------------------------

def test_each_policy_judges_and_ranks_by_usefulness():
    sure, torn, flat = [0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [1 / 3] * 3
    conf = Policy("confidence", 0.6)
    assert judge(conf, {"scores": sure})[0] is False
    hard, use, why = judge(conf, {"scores": torn})
    assert hard and use == pytest.approx(0.5) and why == "confidence<0.6"
    # margin: the top two close together is doubtful even with a fair top-1
    margin = Policy("margin", 0.2)
    assert judge(margin, {"scores": [0.7, 0.3, 0.0]})[0] is False
    hard, use, _ = judge(margin, {"scores": torn})
    assert hard and use == pytest.approx(0.95)
    # entropy: normalised to [0, 1]; a flat answer is the most useful
    ent = Policy("entropy", 0.5)
    assert judge(ent, {"scores": sure})[0] is False
    hard, use, why = judge(ent, {"scores": flat})
    assert hard and use == pytest.approx(1.0) and why == "entropy>0.5"
    # the queue order follows usefulness: the flat answer before the torn one
    assert judge(ent, {"scores": flat})[1] > judge(ent, {"scores": torn})[1]
    # box: a detection in the doubtful band; the middle of the band is most useful
    box = Policy("box", 0.6, box_low=0.2)
    assert judge(box, {"detections": [{"score": 0.9}, {"score": 0.1}]})[0] is False
    hard, use, why = judge(box, {"detections": [{"score": 0.9}, {"score": 0.4}]})
    assert hard and use == pytest.approx(1.0) and why == "box score in [0.2, 0.6)"
    assert judge(box, {"detections": [{"score": 0.55}]})[1] < use
    assert judge(box, {"detections": []})[0] is False
    assert judge(Policy("none"), {"scores": flat})[0] is False
    # no score vector: the answer's score stands in for top-1
    assert judge(conf, {"score": 0.3})[0] is True
    with pytest.raises(ValueError):
        judge(Policy("nonsense"), {"scores": sure})


def test_policy_precedence_manifest_then_node():
    class Manifest:
        policy, threshold, box_low = "margin", 0.3, 0.2

    assert resolve(Manifest()) == Policy("margin", 0.3, 0.2)
    assert resolve(Manifest(), global_threshold=0.5) == Policy("margin", 0.5, 0.2)
    assert resolve(Manifest(), {"policy": "entropy", "threshold": 0.7}, 0.5) == \
        Policy("entropy", 0.7, 0.2)
    assert resolve(None) == Policy("confidence", 0.6, 0.3)


def test_held_out_share_is_stable_and_near_the_fraction():
    ids = [f"{i:032x}" for i in range(4000)]
    share = sum(is_heldout(i, 0.2) for i in ids) / len(ids)
    assert abs(share - 0.2) < 0.03
    assert [is_heldout(i, 0.2) for i in ids[:50]] == [is_heldout(i, 0.2) for i in ids[:50]]
    assert not any(is_heldout(i, 0.0) for i in ids)


# -- on a real node --------------------------------------------------------------------

def _serve_digits(store, node, digits_dir: Path, tmp_path: Path, upload: str | None = None,
                  **cfg):
    agent = node(**cfg)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    if upload is None:
        assign(store)
    else:
        status, body = http("PUT", f"{store.url}{API}/nodes/site-1/apps/digits",
                            {"version": "1.0.0", "upload": upload})
        assert status == 200, body
    wait_until(lambda: (node_app(store) or {}).get("status") == "ready", timeout=60)
    return agent


def _classify(agent, X) -> None:
    for x in X:
        status, body = http("POST", f"{agent.http_url}/v2/models/digits/classify",
                            digit_png(x), "image/png")
        assert status == 200, body


def _settle(agent, n: int) -> None:
    """Wait until the capture thread has taken ``n`` results and stopped keeping."""
    wait_until(lambda: agent.capture.stats["results"] >= n, timeout=15)
    st = agent.capture.stats

    def still() -> bool:
        before = (st["samples_kept"], st["samples_quota_full"], st["samples_rate_limited"])
        time.sleep(0.3)
        return agent.capture._q.empty() and before == (
            st["samples_kept"], st["samples_quota_full"], st["samples_rate_limited"])

    wait_until(still, timeout=15)


def _all_samples(agent) -> list[dict]:
    return jget(f"{agent.http_url}{API}/samples?limit=1000")["samples"]


def test_a_technician_labels_the_queue_and_the_label_reaches_the_cloud(
        loop, digits_dir, tmp_path):  # noqa: F811
    """Hard examples queue up most useful first; a label outside the model's
    classes is refused with the classes; a contradicting label is a 409 naming
    the first one unless overwritten; the label reaches the AppStore."""
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"threshold": 1.0, "max_per_minute": 100000,
                                    "heldout_fraction": 0.25})
    held = np.load(digits_dir / "heldout.npz")
    _classify(agent, held["X_test"][:40])
    _settle(agent, 40)
    kept = agent.capture.stats["samples_kept"]
    assert kept >= 20
    edge = agent.http_url

    q = jget(f"{edge}{API}/labelling/queue?app=digits&limit=50")
    items = q["queue"]
    assert len(items) == kept and q["counts"]["digits"]["unlabelled"] == kept
    use = [i["usefulness"] for i in items]
    assert use == sorted(use, reverse=True) and use[0] > use[-1]
    first = items[0]
    assert first["classes"] == [str(d) for d in range(10)]
    assert first["top"][0]["score"] >= first["top"][1]["score"]
    assert 0 < sum(i["heldout"] for i in items) < kept  # some kept apart, not all

    # the stored input comes back, and as a PNG preview
    status, png = http("GET", f"{edge}{first['input_url']}")
    assert status == 200 and png[:4] == b"\x89PNG"

    sid = first["sample_id"]
    truth = first["prediction"]["label"]  # the technician agrees with the model...
    wrong = str((int(truth) + 1) % 10)  # ...after a slip of the finger

    status, body = http("PUT", f"{edge}{API}/samples/{sid}/label", {"label": "cat"})
    err = json.loads(body)
    assert status == 400 and err["error"] == "unknown_label" and "7" in err["detail"]["classes"]
    status, body = http("PUT", f"{edge}{API}/samples/{sid}/label", b"not json")
    assert status == 400 and json.loads(body)["error"] == "bad_json"
    status, body = http("PUT", f"{edge}{API}/samples/nope/label", {"label": "1"})
    assert status == 404 and json.loads(body)["error"] == "unknown_sample"

    status, body = http("PUT", f"{edge}{API}/samples/{sid}/label",
                        {"label": wrong, "by": "tech-1"})
    assert status == 200, body
    row = json.loads(body)
    assert row["label"] == wrong and row["labelled_by"] == "tech-1"
    status, body = http("PUT", f"{edge}{API}/samples/{sid}/label",
                        {"label": truth, "by": "tech-2"})
    err = json.loads(body)
    assert status == 409 and err["error"] == "label_conflict"
    assert err["detail"]["label"] == wrong and err["detail"]["labelled_by"] == "tech-1"
    status, body = http("PUT", f"{edge}{API}/samples/{sid}/label",
                        {"label": truth, "by": "tech-2", "overwrite": True})
    assert status == 200 and json.loads(body)["label"] == truth

    # labelled samples leave the queue; the counts say so
    q = jget(f"{edge}{API}/labelling/queue?app=digits&limit=200")
    assert sid not in {i["sample_id"] for i in q["queue"]}
    assert q["counts"]["digits"]["labelled"] == 1
    got = jget(f"{edge}{API}/samples?app=digits&state=labelled")["samples"]
    assert [s["sample_id"] for s in got] == [sid]
    status, body = http("GET", f"{edge}{API}/samples?state=maybe")
    assert status == 400 and json.loads(body)["error"] == "bad_request"

    # the cloud has the sample (with its input) and, later, the site's final label
    def cloud_row():
        return next((r for r in feedback(store) if r["sample_id"] == sid), None)

    wait_until(lambda: (r := cloud_row()) and r["label"] == truth, timeout=30)
    r = cloud_row()
    assert r["labelled_by"] == "tech-2" and r["shared"] == "full"
    assert r["input_type"] == "image/png"
    events = jget(f"{store.url}{API}/events?node=site-1&type=sample_labelled")["events"]
    assert len(events) == 2  # the first label and its correction


def test_the_disk_quota_evicts_the_oldest_unlabelled_samples_and_counts_them(
        loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"threshold": 1.0, "max_per_minute": 100000,
                                    "max_samples": 10})
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:6])
    _settle(agent, 6)
    first = _all_samples(agent)[::-1]  # oldest first
    assert len(first) >= 5
    keep = [s["sample_id"] for s in first[:2]]  # the two oldest, labelled: never evicted
    for sid in keep:
        status, body = http("PUT", f"{agent.http_url}{API}/samples/{sid}/label",
                            {"label": "3", "by": "t"})
        assert status == 200, body
    _classify(agent, X[6:40])
    _settle(agent, 40)
    s = agent.capture.stats
    rows = _all_samples(agent)
    assert len(rows) == 10
    assert set(keep) <= {r["sample_id"] for r in rows}
    # every kept sample is either still here or was evicted and counted
    assert s["samples_kept"] - s["samples_evicted"] == 10
    files = list((tmp_path / "edge" / "samples").iterdir())
    assert len(files) == 10  # the evicted inputs are gone from disk too
    # the evicted ones were the oldest unlabelled: none of the first batch is left
    assert not {x["sample_id"] for x in first[2:]} & {r["sample_id"] for r in rows}
    metrics = http("GET", f"{agent.http_url}/metrics")[1].decode()
    assert f'aidc_sample_ops_total{{op="evicted"}} {float(s["samples_evicted"])}' in metrics
    assert 'aidc_samples_stored{app="digits",state="labelled"} 2.0' in metrics


def test_the_quota_full_of_labelled_samples_keeps_no_more_and_says_so(
        loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"threshold": 1.0, "max_per_minute": 100000,
                                    "max_samples": 3})
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:3])
    wait_until(lambda: len(_all_samples(agent)) == 3, timeout=15)
    for r in _all_samples(agent):
        assert http("PUT", f"{agent.http_url}{API}/samples/{r['sample_id']}/label",
                    {"label": "1"})[0] == 200
    _classify(agent, X[3:8])
    _settle(agent, 8)
    assert agent.capture.stats["samples_quota_full"] >= 4
    assert len(_all_samples(agent)) == 3


def test_metadata_upload_sends_no_inputs_and_the_appstore_shows_it(
        loop, digits_dir, tmp_path):  # noqa: F811
    """The operator assigns the app with upload=metadata: predictions and labels
    travel, the inputs stay on site; the AppStore says what the site shares."""
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path, upload="metadata",
                          feedback={"threshold": 1.0, "max_per_minute": 100000})
    wait_until(lambda: (node_app(store) or {}).get("upload") == "metadata", timeout=15)
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:10])
    _settle(agent, 10)
    kept = agent.capture.stats["samples_kept"]
    rows = wait_until(lambda: (r := feedback(store)) and len(r) >= kept and r, timeout=30)
    assert len(rows) == kept
    assert {r["shared"] for r in rows} == {"metadata"}
    assert {r["input_type"] for r in rows} == {"none"}
    assert all(r["input_sha256"] is None for r in rows)
    status, body = http("GET", f"{store.url}{rows[0]['input_url']}")
    assert status == 404 and json.loads(body)["error"] == "input_not_shared"
    # the inputs are still on site for the technician
    local = _all_samples(agent)
    assert http("GET", f"{agent.http_url}{local[0]['input_url']}")[0] == 200
    assert agent.capture.stats["samples_shared_metadata"] == kept


def test_a_site_that_keeps_everything_home_uploads_nothing(loop, digits_dir, tmp_path):  # noqa: F811
    """The site's own config says upload: none (a hospital): the cloud asking for
    full does not loosen it; samples are kept and labelled on site, and not one
    sample, input or label event reaches the AppStore."""
    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path, upload="full",
                          feedback={"threshold": 1.0, "max_per_minute": 100000,
                                    "upload": "none"})
    wait_until(lambda: (node_app(store) or {}).get("upload") == "none", timeout=15)
    X = np.load(digits_dir / "heldout.npz")["X_test"]
    _classify(agent, X[:10])
    _settle(agent, 10)
    kept = agent.capture.stats["samples_kept"]
    assert kept >= 8
    wait_until(lambda: agent.capture.stats["samples_kept_home"] == kept, timeout=10)
    sid = _all_samples(agent)[0]["sample_id"]
    assert http("PUT", f"{agent.http_url}{API}/samples/{sid}/label", {"label": "2"})[0] == 200
    # something that does travel (an event) has arrived, so the feed is live
    wait_until(lambda: jget(f"{store.url}{API}/events?node=site-1&type=app_ready")["events"],
               timeout=15)
    time.sleep(1.0)
    assert feedback(store) == []
    assert jget(f"{store.url}{API}/events?node=site-1&type=sample_labelled")["events"] == []
    assert len(_all_samples(agent)) == kept
