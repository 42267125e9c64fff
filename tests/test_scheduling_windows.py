"""Training windows, the scheduling config and the load gate: pure maths, no processes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from edge_node.scheduling.config import LoadPolicy, ScheduleConfig
from edge_node.scheduling.load import LoadGate
from cloud_sync.windows import TrainingWindow, WindowTable, parse_days

SH = ZoneInfo("Asia/Shanghai")


def _table(*windows: dict, tz: str | None = "Asia/Shanghai") -> WindowTable:
    return WindowTable([TrainingWindow.model_validate(w) for w in windows], tz)


def _at(y, m, d, hh, mm=0, tz=SH) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=tz)


# 2025-01-03 is a Friday, 01-04 Saturday, 01-05 Sunday, 01-06 Monday.

def test_window_crossing_midnight_belongs_to_the_day_it_opens():
    """'fri 20:00-06:00' covers Friday night into Saturday morning, not Friday morning:
    an operator who writes a night window gets exactly that night."""
    t = _table({"card": "cpu", "days": "fri", "start": "20:00", "end": "06:00",
                "training_fraction": 1.0})
    assert t.allowed_fraction("cpu", _at(2025, 1, 3, 19, 59)) == 0.0
    assert t.allowed_fraction("cpu", _at(2025, 1, 3, 20, 0)) == 1.0
    assert t.allowed_fraction("cpu", _at(2025, 1, 4, 5, 59)) == 1.0
    assert t.allowed_fraction("cpu", _at(2025, 1, 4, 6, 0)) == 0.0
    assert t.allowed_fraction("cpu", _at(2025, 1, 3, 3, 0)) == 0.0  # Thursday's night: no
    assert t.allowed_fraction("gpu0", _at(2025, 1, 3, 21, 0)) == 0.0  # other card


def test_weekday_nights_and_whole_weekends():
    """The reference plan: weekday nights at 0.5 of the CPU, whole weekends at 1.0;
    Monday early morning is Sunday's night only if Sunday opens a night window."""
    t = _table({"card": "cpu", "days": "mon-fri", "start": "20:00", "end": "06:00",
                "training_fraction": 0.5},
               {"card": "*", "days": "weekends", "training_fraction": 1.0})
    assert t.allowed_fraction("cpu", _at(2025, 1, 6, 3, 0)) == 0.0  # Monday 03:00
    assert t.allowed_fraction("cpu", _at(2025, 1, 6, 12, 0)) == 0.0  # Monday noon
    assert t.allowed_fraction("cpu", _at(2025, 1, 6, 22, 0)) == 0.5  # Monday night
    assert t.allowed_fraction("cpu", _at(2025, 1, 4, 3, 0)) == 1.0  # Saturday: max wins
    assert t.allowed_fraction("gpu0", _at(2025, 1, 5, 23, 59)) == 1.0  # '*' card, Sunday
    assert t.allowed_fraction("gpu0", _at(2025, 1, 6, 0, 0)) == 0.0


def test_time_zone_of_the_schedule_not_of_the_caller():
    """Windows are wall-clock in the schedule's zone, whatever zone 'now' comes in."""
    t = _table({"card": "cpu", "start": "20:00", "end": "06:00", "training_fraction": 1.0})
    assert t.allowed_fraction("cpu", datetime(2025, 1, 3, 12, 30, tzinfo=UTC)) == 1.0  # 20:30
    assert t.allowed_fraction("cpu", datetime(2025, 1, 3, 11, 30, tzinfo=UTC)) == 0.0  # 19:30
    with pytest.raises(ValueError, match="naive"):
        t.allowed_fraction("cpu", datetime(2025, 1, 3, 12, 30))


def test_no_time_zone_means_the_system_local_zone(monkeypatch):
    """Left out, the time zone is the box's own (TZ / /etc/localtime)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        t = _table({"card": "cpu", "start": "09:00", "end": "10:00", "training_fraction": 1},
                   tz=None)
        assert t.allowed_fraction("cpu", datetime(2025, 1, 3, 0, 30, tzinfo=UTC)) == 1.0
        assert t.allowed_fraction("cpu", datetime(2025, 1, 3, 9, 30, tzinfo=UTC)) == 0.0
        assert t.next_change("cpu", datetime(2025, 1, 3, 0, 30, tzinfo=UTC)) == \
            datetime(2025, 1, 3, 1, 0, tzinfo=UTC)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_next_change_is_the_next_boundary_that_changes_the_fraction():
    """The scheduler sleeps until next_change; adjacent windows with the same share are
    one stretch, and with no window at all it says 'nothing within the horizon'."""
    t = _table({"card": "cpu", "days": "fri", "start": "20:00", "end": "24:00",
                "training_fraction": 1.0},
               {"card": "cpu", "days": "sat", "start": "00:00", "end": "06:00",
                "training_fraction": 1.0})
    assert t.next_change("cpu", _at(2025, 1, 3, 12, 0)) == _at(2025, 1, 3, 20, 0)
    assert t.next_change("cpu", _at(2025, 1, 3, 21, 0)) == _at(2025, 1, 4, 6, 0)
    assert t.next_change("cpu", _at(2025, 1, 4, 7, 0)) == _at(2025, 1, 10, 20, 0)
    now = _at(2025, 1, 4, 7, 0)
    assert _table().next_change("cpu", now) == now + timedelta(days=8)


def test_daylight_saving_night_window_keeps_wall_clock_times():
    """Across the spring-forward night in Berlin a 22:00-06:00 window still closes at
    06:00 local (04:00 UTC, not 05:00)."""
    t = _table({"card": "cpu", "start": "22:00", "end": "06:00", "training_fraction": 1},
               tz="Europe/Berlin")
    before = datetime(2025, 3, 29, 21, 30, tzinfo=UTC)  # Sat 22:30 CET
    assert t.allowed_fraction("cpu", before) == 1.0
    assert t.next_change("cpu", before) == datetime(2025, 3, 30, 4, 0, tzinfo=UTC)


def test_days_syntax():
    """Ranges wrap around the week; aliases and lists combine."""
    assert parse_days("fri-mon") == {4, 5, 6, 0}
    assert parse_days("Mon,wed-thu") == {0, 2, 3}
    assert parse_days("*") == parse_days("daily") == set(range(7))
    assert parse_days("weekdays,sun") == {0, 1, 2, 3, 4, 6}


@pytest.mark.parametrize("window, words", [
    ({"days": "mon-fry"}, ["days", "mon-fry", "mon-fri"]),
    ({"start": "25:00"}, ["start", "25:00", "00-23"]),
    ({"start": "8:00"}, ["start", "HH:MM"]),
    ({"start": "24:00"}, ["start", "24:00"]),
    ({"start": "06:00", "end": "06:00"}, ["ambiguous", "24:00"]),
    ({"training_fraction": 0}, ["training_fraction", "greater than 0"]),
    ({"training_fraction": 1.5}, ["training_fraction"]),
    ({"card": "gpu 0"}, ["card"]),
    ({"hours": "1-2"}, ["hours", "Extra inputs"]),
])
def test_bad_windows_are_refused_with_the_key_and_why(window, words):
    """A typo in a window must not silently mean 'never' or 'always'."""
    raw = {"card": "cpu", "training_fraction": 1.0, **window}
    with pytest.raises(ValidationError) as err:
        TrainingWindow.model_validate(raw)
    text = str(err.value)
    assert all(w in text for w in words), text


def test_schedule_config_rejects_unknown_zones_and_flat_hysteresis():
    """An unknown time zone or idle/busy marks with no gap are config errors."""
    with pytest.raises(ValidationError, match="Mars/Olympus"):
        ScheduleConfig.model_validate({"timezone": "Mars/Olympus"})
    with pytest.raises(ValidationError, match="hysteresis"):
        ScheduleConfig.model_validate({"load": {"idle_below": 0.5, "busy_above": 0.5}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ScheduleConfig.model_validate({"window": []})
    cfg = ScheduleConfig.model_validate({"timezone": "UTC", "windows": [
        {"card": "cpu", "days": "sat-sun", "training_fraction": 1}]})
    assert cfg.windows[0].end == "24:00" and cfg.load.train_when_idle


def test_load_gate_hysteresis():
    """Busy needs a sustained high load, and only a sustained low load clears it;
    loads between the marks change nothing, so training does not flap."""
    g = LoadGate("cpu", LoadPolicy(idle_below=0.2, idle_for_s=30, busy_above=0.6,
                                   busy_for_s=5))
    g.sample(0.9, 0)
    g.sample(0.9, 4)
    assert not g.busy  # a 4 s spike is not 'busy'
    g.sample(0.4, 4.5)
    g.sample(0.9, 5)
    g.sample(0.9, 9)
    assert not g.busy  # the stretch restarted at 5
    g.sample(0.9, 10)
    assert g.busy
    g.sample(0.1, 11)
    g.sample(0.5, 40)
    assert g.busy  # 0.5 is between the marks: still busy
    g.sample(0.1, 41)
    assert not g.idle_at(60) and g.idle_at(71)
    g.sample(0.1, 71)
    assert not g.busy


def _keys(model, prefix: str) -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        sub = f.annotation if hasattr(f.annotation, "model_fields") else None
        out += _keys(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def test_docs_cover_every_key_state_event_and_env_variable():
    """docs/scheduling.md is what an operator or a job author reads: it must name every
    config key, window key, job state, event and AIDC_JOB_* variable."""
    from edge_node.scheduling.jobs import _ALLOWED
    from edge_node.scheduling.runner import job_env
    from edge_node.scheduling.scheduler import EVENTS

    doc = (Path(__file__).parent.parent / "docs" / "scheduling.md").read_text()
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {}, clear=True):  # the job's own variables, not the box's
        env = [k for k in job_env("j", "cpu", 1, [0], Path("/c"), False, {}) if k.startswith(
            ("AIDC_JOB", "OMP", "OPENBLAS", "MKL"))]
    names = (_keys(ScheduleConfig, "scheduling.") + list(TrainingWindow.model_fields)
             + list(_ALLOWED) + list(EVENTS) + env)
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"undocumented in docs/scheduling.md: {missing}"
