"""disk_space: a real data dir (real sample files, real node.db rows, real package
blobs and logs) with a quota given through the injectable free-space probe; the
eviction path is the real one."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from cloud_sync.outbox import open_db
from edge_node.health import FaultJournal, HealError, Monitor
from edge_node.health.disk_space import MB, DiskSpaceCheck
from edge_node.store import NodeStore

KB = 1024


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Quota:
    """The data dir as if on a disk of ``total`` bytes: free = total - what it holds."""

    def __init__(self, total: int):
        self.total = total
        self.calls = 0

    def __call__(self, path: Path) -> tuple[int, int]:
        self.calls += 1
        return self.total, max(0, self.total - du(path))


class Site:
    def __init__(self, root: Path):
        self.d = root / "data"
        (self.d / "samples").mkdir(parents=True)
        self.store = NodeStore(self.d / "node.db")
        self.outbox = open_db(self.d / "node.db")
        self.t0 = time.time() - 3600

    def sample(self, i: int, *, sent: str | None, label: str | None = None,
               size: int = 500 * KB, shared: str = "full") -> str:
        sid = f"s{i:03d}-{uuid.uuid4().hex[:6]}"
        path = self.d / "samples" / f"{sid}.npy"
        path.write_bytes(os.urandom(size))
        self.store.add_sample({
            "sample_id": sid, "created_at": self.t0 + i, "app": "digits", "version": "1.0.0",
            "reason": "low_confidence", "input_type": "application/x-npy",
            "input_path": str(path), "prediction": "{}", "scores": "[]", "label": label,
            "source": "test", "msg_id": sid, "nbytes": size})
        if sent is not None:  # in the outbox: 'pending', 'acked' or 'rejected'
            self.store.set_shared(sid, shared)
            self.store.mark_queued(sid)
            self.outbox.execute(
                "INSERT INTO cloud_sync_outbox (msg_id, kind, topic, payload, qos, created_at,"
                " state, attempts) VALUES (?, 'feedback', 't', x'00', 1, ?, ?, 1)",
                [sid, self.t0 + i, sent])
        return sid

    def blob(self, app: str, version: str, at: float, size: int = 1 * MB) -> str:
        sha = uuid.uuid4().hex * 2
        p = self.d / "blobs" / sha
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(size))
        os.utime(p, (at, at))
        self.store.record_installed(app, version, sha, self.d / "apps" / sha)
        with self.store._lock, self.store._db.conn:
            self.store._db.execute("UPDATE installed SET installed_at = ? WHERE sha256 = ?",
                                   [at, sha])
        return sha

    def ids(self) -> set[str]:
        return {r["sample_id"] for r in self.store.samples(limit=1000)}

    def close(self):
        self.outbox.close()
        self.store.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def build(site: Site):
    """5 uploaded unlabelled + 5 uploaded labelled, 5 unsent unlabelled + 3 unsent
    labelled (500 KB each), 5 versions of a package (1 MB each), logs."""
    up_unl = [site.sample(i, sent="acked") for i in range(5)]
    up_lab = [site.sample(10 + i, sent="acked", label="7") for i in range(5)]
    unsent = [site.sample(20 + i, sent="pending") for i in range(5)]
    unsent_lab = [site.sample(30 + i, sent=None, label="3") for i in range(3)]
    old = time.time() - 7200
    blobs = [site.blob("digits", f"1.0.{v}", old + v) for v in range(5)]
    logs = site.d / "logs"
    logs.mkdir()
    (logs / "agent.log").write_bytes(os.urandom(200 * KB))
    (logs / "agent.log.1").write_bytes(os.urandom(1 * MB))
    return up_unl, up_lab, unsent, unsent_lab, blobs


def check(site, quota, **marks):
    return DiskSpaceCheck(site.d, free_probe=quota, low_fraction=0, high_fraction=0,
                          critical_fraction=0, **marks)


def test_above_the_low_mark_is_ok(site):
    build(site)
    c = check(site, Quota(du(site.d) + 10 * MB), low_mb=5, high_mb=8, critical_mb=1)
    f = c.probe()
    assert f.ok and f.data["free_mb"] >= 9


def test_low_evicts_uploaded_samples_first_unlabelled_oldest_first(site):
    up_unl, up_lab, unsent, unsent_lab, blobs = build(site)
    quota = Quota(du(site.d) + 3 * MB)  # 3 MB free: below low (4), heal to high (5)
    c = check(site, quota, low_mb=4, high_mb=5, critical_mb=1)
    f = c.probe()
    assert not f.ok and f.fault == "disk_low"
    remedy = c.heal(f)
    assert "uploaded samples" in remedy and "blobs" not in remedy
    left = site.ids()
    gone = set(up_unl) - left
    # ~2 MB at 500 KB each, the oldest unlabelled uploaded ones
    assert len(gone) >= 3 and gone == set(up_unl[:len(gone)])
    assert set(up_lab) <= left and set(unsent) <= left and set(unsent_lab) <= left
    for sid in gone:
        assert not list((site.d / "samples").glob(f"{sid}.*"))
    assert all((site.d / "blobs" / b).exists() for b in blobs)
    assert c.probe().ok and c.probe().data["free_mb"] >= 5


def test_then_old_package_versions_then_rotated_logs_never_unsent(site):
    up_unl, up_lab, unsent, unsent_lab, blobs = build(site)
    quota = Quota(du(site.d) + 1.5 * MB)
    # needs 9 MB: 5 MB of uploaded samples + 2 old blobs + the rotated log is 8 MB
    c = check(site, quota, low_mb=10, high_mb=12, critical_mb=1)
    f = c.probe()
    assert not f.ok
    with pytest.raises(HealError, match="nothing else may go"):
        c.heal(f)
    # the finding carries what was evicted even when it was not enough
    assert f.data["evicted"]["uploaded samples"]["count"] == 10
    assert f.data["evicted"]["package blobs"]["count"] == 2
    assert f.data["evicted"]["logs and bundles"]["count"] == 1
    assert f.data["unsent_evicted"] == 0
    left = site.ids()
    assert not (set(up_unl) | set(up_lab)) & left
    assert set(unsent) | set(unsent_lab) <= left
    # the running version is not known here: the newest three are kept
    assert [(site.d / "blobs" / b).exists() for b in blobs] == [False, False, True, True, True]
    assert (site.d / "logs" / "agent.log").exists()
    assert not (site.d / "logs" / "agent.log.1").exists()


def test_the_running_version_and_the_two_newest_others_are_kept(site):
    build(site)
    blobs = [p.name for p in sorted((site.d / "blobs").iterdir(), key=lambda p: p.stat().st_mtime)]
    running = blobs[1]  # rolled back to an old one: it and the two newest others stay
    quota = Quota(du(site.d) + 1 * MB)
    c = check(site, quota, low_mb=29, high_mb=30, critical_mb=0.5, running=lambda: {running})
    with pytest.raises(HealError):
        c.heal(c.probe())
    assert sorted(p.name for p in (site.d / "blobs").iterdir()) == sorted(
        [running, blobs[3], blobs[4]])


def test_critical_evicts_unsent_unlabelled_oldest_first_counted(site):
    up_unl, up_lab, unsent, unsent_lab, blobs = build(site)
    quota = Quota(du(site.d) + 0.5 * MB)  # below critical (1 MB)
    c = check(site, quota, low_mb=2, high_mb=10, critical_mb=1)
    f = c.probe()
    assert f.fault == "disk_critical" and f.data["critical"]
    remedy = c.heal(f)
    assert "unsent samples" in remedy
    n = f.data["unsent_evicted"]
    assert n >= 1 and c.totals["unsent_evicted"] == n
    left = site.ids()
    assert set(unsent) - left == set(unsent[:n])  # the oldest
    assert set(unsent_lab) <= left  # labelled ones never
    assert c.probe().ok


def test_a_pending_fetch_is_not_evicted(site):
    build(site)
    part = site.d / "blobs" / ("f" * 64 + ".part")
    part.write_bytes(os.urandom(1 * MB))  # fresh: a fetch in progress
    stale = site.d / "blobs" / ("e" * 64 + ".part")
    stale.write_bytes(os.urandom(1 * MB))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    c = check(site, Quota(du(site.d) + 1 * MB), low_mb=29, high_mb=30, critical_mb=0.5)
    with pytest.raises(HealError):
        c.heal(c.probe())
    assert part.exists() and not stale.exists()


def test_through_the_monitor_journal_and_events(site):
    build(site)
    events = []
    quota = Quota(du(site.d) + 3 * MB)
    j = FaultJournal(site.d / "node.db")
    m = Monitor([check(site, quota, low_mb=4, high_mb=5, critical_mb=1)], j,
                lambda t, severity="info", app=None, data=None: events.append((t, data)))
    [f] = m.run_all(heal=True)
    assert f.ok
    assert [t for t, _ in events] == ["fault_detected", "fault_healed"]
    assert events[0][1]["fault"] == "disk_low"
    assert "evicted" in events[1][1]["remedy"]
    s = j.summary()["disk_low"]
    assert s["detected"] == s["healed"] == 1
    j.close()


def test_bad_marks_and_an_unreadable_disk(site):
    with pytest.raises(ValueError, match="critical <= low <= high"):
        DiskSpaceCheck(site.d, low_mb=10, high_mb=5)

    def broken(path):
        raise OSError(5, "I/O error")

    c = DiskSpaceCheck(site.d, free_probe=broken)
    f = c.probe()
    assert not f.ok and f.fault == "disk_unreadable" and "I/O error" in f.detail
    with pytest.raises(HealError):
        c.heal(f)


def test_default_probe_reads_the_real_disk(site):
    f = DiskSpaceCheck(site.d, low_mb=0, high_mb=0, critical_mb=0, low_fraction=0,
                       high_fraction=0, critical_fraction=0).probe()
    assert f.ok and f.data["total_mb"] > 0
