"""model_integrity: a served app's model file truncated or changed on disk is found
(size at once, sha256 on the full pass), unpacked again from its verified package in
the local blob cache and served by a new worker; a damaged cached package is
deleted and fetched again -- a real signed package, a real reconciler, real worker
processes with a real ONNX model. The cloud's blob transfer is stood in for by a
directory (the transfer itself is tested in test_blobs.py)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from appstore.signing import SigningKey
from cloud_sync import schemas
from cloud_sync.package import sha256_file
from edge_node.health import FaultJournal, Monitor
from edge_node.health.model_integrity import ModelIntegrityCheck
from edge_node.reconciler import Reconciler
from edge_node.resources import Placement, discover_cards
from edge_node.serving.registry import AppRegistry
from edge_node.store import NodeStore
from edge_node.worker.supervisor import WorkerSupervisor
from tests.appstore_support import digits_dir, digits_package  # noqa: F401
from tests.test_e2e import assign, loop, node_app, publish, v2_infer  # noqa: F401
from tests.test_health_worker_stuck import agent_fault_events
from tests.models import wait_for, _sample_dir, pid_alive, worker_pids


class CloudBlobs:
    """Stands in for the BlobFetcher: copies a package from 'the cloud' (a directory)."""

    def __init__(self, cloud: Path, dest: Path) -> None:
        self.cloud, self.dest, self.fetched = cloud, dest, []

    def fetch(self, sha256, size, progress=None, timeout=None, cancel=None) -> Path:
        self.fetched.append(sha256)
        self.dest.mkdir(parents=True, exist_ok=True)
        part = self.dest / f"{sha256}.part"
        shutil.copyfile(self.cloud / sha256, part)
        part.rename(self.dest / sha256)
        return self.dest / sha256


@pytest.fixture
def node(tmp_path):
    key = SigningKey.generate()
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    built = tmp_path / "digits.aidcpkg"
    sha, size = digits_package(_sample_dir(), key, built)
    shutil.copyfile(built, cloud / sha)
    run_dir = Path(tempfile.mkdtemp(prefix="aidc-w-", dir="/tmp"))
    sup = WorkerSupervisor(run_dir, restart_budget=(3, 60.0))
    store = NodeStore(tmp_path / "node.db")
    registry = AppRegistry()
    fetcher = CloudBlobs(cloud, tmp_path / "blobs")
    rec = Reconciler(node_id="n1", store=store, fetcher=fetcher, supervisor=sup,
                     registry=registry, trusted_keys=lambda: {key.key_id: key.public_raw},
                     blobs_dir=tmp_path / "blobs", apps_dir=tmp_path / "apps",
                     on_change=lambda: None, placement=Placement(discover_cards()))
    rec.start()
    rec.on_desired_message("t", schemas.DesiredState(node_id="n1", revision=1, apps=[
        schemas.AppRef(name="digits", version="1.0.0", sha256=sha, size=size)]).to_bytes(),
        True)
    wait_for(lambda: [r for r in rec.reports() if r.status == "ready"], 60, "digits ready")
    yield {"rec": rec, "sup": sup, "registry": registry, "fetcher": fetcher, "sha": sha,
           "app_dir": tmp_path / "apps" / "digits" / sha[:16], "blob": tmp_path / "blobs" / sha}
    rec.stop()
    sup.stop_all()
    assert worker_pids(str(run_dir)) == []
    store.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def _monitor(check):
    events: list[tuple[str, dict]] = []
    journal = FaultJournal(None)
    mon = Monitor([check], journal, lambda type, severity="info", app=None, data=None:
                  events.append((type, data or {})))
    return mon, events, journal


def _serves(node) -> bool:
    with np.load(_sample_dir() / "heldout.npz") as z:
        x, y = z["X_test"], z["y_test"]
    app = node["registry"].get("digits")
    return (app.client.infer({"input": x})["label"] == y).mean() > 0.9


def test_intact_apps_pass_and_the_cheap_probe_reads_nothing(node):
    check = ModelIntegrityCheck(node["rec"])
    f = check.probe()
    assert f.ok and f.data["full"] and f.data["apps"] == ["digits"], f.detail
    hashed = check.stats["files_hashed"]
    assert hashed >= 2  # model + manifest (+ labels)
    f = check.probe()
    assert f.ok and not f.data["full"] and check.stats["files_hashed"] == hashed


def test_a_truncated_model_is_unpacked_again_and_a_new_worker_serves(node):
    model = node["app_dir"] / "model.onnx"
    good = sha256_file(model)
    pid = node["sup"].status()[f"digits@{node['sha'][:12]}"]["pid"]
    check = ModelIntegrityCheck(node["rec"])
    assert check.probe().ok
    with open(model, "r+b") as f:  # a power cut mid-write: the file is cut short
        f.truncate(model.stat().st_size // 2)
    mon, events, journal = _monitor(check)
    [after] = mon.run_all(heal=True)
    detected = [d for t, d in events if t == "fault_detected"]
    assert detected[0]["fault"] == "model_corrupt"
    assert "model.onnx is" in detected[0]["detail"] and "signed" in detected[0]["detail"]
    healed = [d for t, d in events if t == "fault_healed"]
    assert healed, events
    assert "unpacked again from the cached package" in healed[0]["remedy"]
    assert after.ok and sha256_file(model) == good
    key = f"digits@{node['sha'][:12]}"
    st = node["sup"].status()[key]
    assert st["state"] == "ready" and st["pid"] not in (None, pid) and not pid_alive(pid)
    assert _serves(node)
    assert node["fetcher"].fetched == [node["sha"]]  # the local copy did it: no re-fetch
    assert journal.summary()["model_corrupt"]["healed"] == 1


def test_a_changed_model_of_the_same_size_is_found_by_its_hash(node):
    model = node["app_dir"] / "model.onnx"
    check = ModelIntegrityCheck(node["rec"], full_every_s=3600)
    assert check.probe().ok
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size kept
    stamp = model.stat()
    model.write_bytes(bytes(data))
    f = check.probe()  # mtime moved: hashed again at once
    assert not f.ok and "does not match its signed sha256" in f.detail, f.detail
    # bit rot keeps size and mtime: only the full pass finds it
    os.utime(model, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    check2 = ModelIntegrityCheck(node["rec"], full_every_s=3600)
    assert not check2.probe().ok  # a first probe is a full pass


def test_a_bad_cached_package_is_deleted_and_fetched_again(node):
    model = node["app_dir"] / "model.onnx"
    model.write_bytes(b"not a model")
    with open(node["blob"], "r+b") as f:  # the cached package is damaged too
        f.seek(100)
        f.write(b"\0" * 64)
    check = ModelIntegrityCheck(node["rec"])
    mon, events, _ = _monitor(check)
    [after] = mon.run_all(heal=True)
    healed = [d for t, d in events if t == "fault_healed"]
    assert healed, events
    assert "cached package bad too (hash_mismatch): deleted, fetched again" in \
        healed[0]["remedy"]
    assert after.ok
    assert node["fetcher"].fetched == [node["sha"]] * 2
    assert sha256_file(node["blob"]) == node["sha"]
    assert _serves(node)


def test_a_running_agent_heals_a_truncated_model(loop, digits_dir, tmp_path):  # noqa: F811
    store, node = loop
    agent = node()
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    publish(store, digits_dir / "model.onnx", manifest, digits_dir / "labels.txt",
            tmp_path / "d.aidc")
    assign(store)
    wait_for(lambda: (node_app(store) or {}).get("status") == "ready", 60, "ready")
    sha = agent.reconciler.serving("digits")["sha256"]
    model = agent.cfg.data_dir / "apps" / "digits" / sha[:16] / "model.onnx"
    good = sha256_file(model)
    with open(model, "r+b") as f:
        f.truncate(1000)
    wait_for(lambda: [e["type"] for e in agent_fault_events(agent, "model_corrupt")]
             == ["fault_detected", "fault_healed"], 60, "the model healed")
    assert sha256_file(model) == good
    x = np.load(digits_dir / "heldout.npz")["X_test"][:5]
    status, out = v2_infer(agent.http_url, x)
    assert status == 200, out


def test_a_version_other_than_the_desired_one_is_not_reinstalled(node):
    """A crash loop rolled the app back to its last known good: reinstalling would act
    on the desired version, so the remedy says why it does nothing."""
    from edge_node.health import Finding, HealError

    check = ModelIntegrityCheck(node["rec"])
    other = "ab" * 32
    f = Finding("model_integrity", False, "damaged", fault="model_corrupt",
                data={"apps": {"digits": {"sha256": other, "app_dir": str(node["app_dir"]),
                                          "problems": ["model.onnx is missing"]}}})
    with pytest.raises(HealError, match="not the desired version"):
        check.heal(f)
    assert (node["app_dir"] / ".complete").exists()  # untouched
