"""The health monitor: episodes journalled in a real node.db, events per episode
not per probe, a raising check is a finding, the thread survives everything."""

from __future__ import annotations

import threading
import time

import pytest

from edge_node.health import Check, FaultJournal, Finding, FunctionCheck, HealError, Monitor


class Events:
    def __init__(self):
        self.items: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, type, severity="info", app=None, data=None):
        with self.lock:
            self.items.append((type, severity, data or {}))

    def types(self):
        with self.lock:
            return [t for t, _, _ in self.items]


class Flappy(Check):
    """Broken until healed ``heals_needed`` times."""
    name = "flappy"
    interval_s = 0.05

    def __init__(self, heals_needed=1, heal_error=None):
        self.broken = True
        self.heals_needed = heals_needed
        self.heal_error = heal_error
        self.heals = 0

    def probe(self):
        if self.broken:
            return Finding(self.name, False, "it is broken", fault="flap", data={"x": 1})
        return Finding(self.name, True, "fine")

    def heal(self, finding):
        self.heals += 1
        if self.heal_error:
            raise self.heal_error
        if self.heals >= self.heals_needed:
            self.broken = False
        return f"fixed it (try {self.heals})"


def wait_for(pred, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def journal(tmp_path):
    j = FaultJournal(tmp_path / "node.db")
    yield j
    j.close()


def test_a_fault_is_detected_healed_journalled_and_reported_once(journal):
    ev, c = Events(), Flappy()
    m = Monitor([c], journal, ev)
    findings = m.run_all(heal=True)
    assert [f.ok for f in findings] == [True]
    assert ev.types() == ["fault_detected", "fault_healed"]
    healed = ev.items[1][2]
    assert healed["fault"] == "flap" and healed["remedy"] == "fixed it (try 1)"
    assert healed["seconds"] >= 0
    s = journal.summary()["flap"]
    assert s["detected"] == 1 and s["healed"] == 1 and s["unhealed"] == 0
    assert s["first_detected"] and s["last_healed"] >= s["first_detected"]
    assert s["mean_time_to_heal_s"] is not None
    phases = [r["phase"] for r in journal.recent()]
    assert phases == ["healed", "detected"]


def test_probe_only_touches_nothing(journal):
    ev, c = Events(), Flappy()
    m = Monitor([c], journal, ev)
    f = m.run_all(heal=False)
    assert not f[0].ok and c.heals == 0 and ev.items == [] and journal.summary() == {}


def test_thread_heals_a_persisting_fault_without_an_event_storm(journal):
    ev = Events()
    c = Flappy(heals_needed=3)
    m = Monitor([c], journal, ev)
    m.heal_backoff_max_s = 0.1
    m.start()
    try:
        assert wait_for(lambda: "fault_healed" in ev.types())
    finally:
        m.stop()
    # detected, the first failed remedy, then healed -- not one per probe
    assert ev.types() == ["fault_detected", "fault_unhealed", "fault_healed"]
    assert c.heals == 3
    assert ev.items[-1][2]["count"] >= 3
    s = journal.summary()["flap"]
    assert (s["detected"], s["healed"], s["unhealed"]) == (1, 1, 1)


def test_a_persisting_fault_is_rereported_with_a_count(journal):
    ev = Events()
    c = Flappy(heal_error=HealError("the disk is read-only"))
    m = Monitor([c], journal, ev)
    m.repeat_s = 0.3
    m.heal_backoff_max_s = 0.05
    m.start()
    try:
        assert wait_for(lambda: ev.types().count("fault_unhealed") >= 3)
    finally:
        m.stop()
    types = ev.types()
    assert types[0] == "fault_detected" and types.count("fault_detected") == 1
    first, later = ev.items[1][2], [d for t, _, d in ev.items[2:] if t == "fault_unhealed"]
    assert first["why"] == "the disk is read-only"
    assert later[0]["repeated"] and later[-1]["count"] > later[0]["count"] >= 2
    # far fewer events than probes
    assert len(types) < m.stats["probes"] / 2
    assert m.open_faults()["flappy"]["fault"] == "flap"


def test_a_check_that_raises_is_a_finding_and_the_thread_lives_on(journal):
    ev = Events()
    boom = FunctionCheck("boom", lambda: 1 / 0, interval_s=0.05)
    c = Flappy()
    m = Monitor([boom, c], journal, ev)
    m.start()
    try:
        assert wait_for(lambda: "fault_healed" in ev.types())
        assert wait_for(lambda: m.stats["probe_errors"] >= 3)  # still probing
    finally:
        m.stop()
    f = [x for x in m.last_findings() if x.check == "boom"][0]
    assert not f.ok and f.fault == "check_error" and "ZeroDivisionError" in f.detail
    assert journal.summary()["check_error"]["detected"] == 1


def test_a_remedy_that_raises_anything_is_unhealed_not_a_crash(journal):
    ev = Events()
    c = Flappy(heal_error=RuntimeError("kaput"))
    f = Monitor([c], journal, ev).run_all(heal=True)
    assert not f[0].ok
    assert "RuntimeError: kaput" in ev.items[-1][2]["why"]


def test_a_fault_that_goes_away_by_itself_closes_the_episode(journal):
    ev = Events()
    c = Flappy(heal_error=HealError("no automatic remedy"))
    m = Monitor([c], journal, ev)
    m.run_all(heal=True)
    c.broken = False
    m.run_all(heal=True)
    assert ev.types() == ["fault_detected", "fault_unhealed", "fault_healed"]
    assert ev.items[-1][2]["remedy"] == "recovered by itself"


def test_injected_clock_times_the_episode(journal):
    t = [1000.0]
    ev = Events()
    c = Flappy(heal_error=HealError("later"))
    m = Monitor([c], journal, ev, clock=lambda: t[0])
    m.run_all(heal=True)
    t[0] += 12.5
    c.broken = False
    m.run_all(heal=True)
    assert ev.items[-1][2]["seconds"] == 12.5
    assert journal.summary()["flap"]["mean_time_to_heal_s"] == 12.5


def test_broken_outputs_do_not_stop_the_monitor(tmp_path):
    class BadJournal:
        def __getattr__(self, name):
            raise OSError("disk gone")

    def bad_emit(*a, **k):
        raise RuntimeError("outbox full")

    f = Monitor([Flappy()], BadJournal(), bad_emit).run_all(heal=True)
    assert f[0].ok


def test_bad_checks_are_refused_clearly(journal):
    m = Monitor([], journal, None)
    with pytest.raises(TypeError):
        m.add(object())
    m.add(Flappy())
    with pytest.raises(ValueError, match="already"):
        m.add(Flappy())
    with pytest.raises(ValueError, match="interval_s"):
        FunctionCheck("x", lambda: None, interval_s=0)


def test_journal_survives_reopen_and_is_shared_with_the_store(tmp_path):
    from edge_node.store import NodeStore
    store = NodeStore(tmp_path / "node.db")
    j = FaultJournal(tmp_path / "node.db")
    j.noted("config_corrupt", "config", "truncated", remedy="started from last good")
    j.close()
    store.close()
    j2 = FaultJournal(tmp_path / "node.db")
    s = j2.summary()["config_corrupt"]
    assert s["detected"] == 1 and s["healed"] == 1
    assert j2.stats()["detected"] == 1
    with pytest.raises(ValueError):
        j2._add("bogus", "k", "c")
    j2.close()


def test_the_journal_is_bounded(tmp_path):
    j = FaultJournal(tmp_path / "node.db", keep=50)
    for i in range(250):
        j.detected("flap", "flappy", f"#{i}", ts=float(i))
    rows = j.recent(limit=1000)
    assert 50 <= len(rows) < 150 and rows[0]["detail"] == "#249"
    assert j.pruned == 250 - len(rows)
    with pytest.raises(ValueError):
        FaultJournal(None, keep=1)
    j.close()


def test_a_worker_starting_is_not_a_fault_until_its_grace_runs_out():
    from edge_node.selfcheck import WorkersCheck
    t = [0.0]
    status = {"a": {"state": "ready", "pid": 1}, "b": {"state": "starting", "pid": 2}}
    c = WorkersCheck(lambda: status, grace_s=20, clock=lambda: t[0])
    f = c.probe()
    assert f.ok and "starting: b (starting)" in f.detail
    t[0] = 25.0
    f = c.probe()
    assert not f.ok and f.fault == "worker_down"
    status["b"] = {"state": "ready", "pid": 3}
    assert c.probe().ok
    status["b"] = {"state": "failed", "pid": None}  # failed: at once
    assert not c.probe().ok
