"""Alarms: rules turn a camera's results into alarms that a person handles on site.

A rule (``alarms.rules`` in the node config, :class:`~edge_node.config.AlarmRule`)
raises an alarm when at least ``n`` of a stream's last ``m`` results have one of
its ``labels`` at ``min_score`` or more. There is one active alarm per (rule,
stream) at a time: further matching frames only move its ``last_seen`` and
count its ``frames`` (no alarm storms). It clears itself after ``clear_after_s``
without a matching frame, unless the rule latches it.

States: ``open`` -> ``acknowledged`` -> ``resolved`` | ``false_alarm``; an
active (open or acknowledged) alarm may also become ``cleared``, and a cleared
one may still be marked a false alarm. A **false alarm** becomes a hard example:
the frame that raised it is kept as a sample through the capture path (quota,
upload level), labelled with the correct class given, else with the rule's
``false_alarm_label``, else unlabelled at the top of the labelling queue.

:class:`Engine` is the N-of-M logic, pure (no threads, no I/O). :class:`Alarms`
wires it: :meth:`Alarms.observe` runs on a stream's result thread and only
decides and copies the evidence frame (the shared-memory slot may be reused at
any time); one writer thread stores alarms and their evidence, clears quiet ones
and sends the events; :meth:`Alarms.act` is the people's side (the REST API).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .capture import Capture, Observation
from .config import AlarmRule, AlarmsConfig
from .store import NodeStore
from .streams.snapshot import frame_png

logger = logging.getLogger(__name__)

STATES = ("open", "acknowledged", "resolved", "false_alarm", "cleared")
ACTIVE = ("open", "acknowledged")
#: action -> (the states it may leave, the state it enters, the event it sends)
ACTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "ack": (("open",), "acknowledged", "alarm_acknowledged"),
    "resolve": (ACTIVE, "resolved", "alarm_resolved"),
    "false_alarm": (ACTIVE + ("cleared",), "false_alarm", "alarm_false"),
}
#: history entry's state -> the event it sends
EVENTS = {"open": "alarm_raised", "cleared": "alarm_cleared",
          **{to: ev for _, to, ev in ACTIONS.values()}}
#: how often the writer clears quiet alarms and stores frame counts (seconds)
TICK = 0.5
QUEUE_MAX = 1000


class AlarmError(Exception):
    """Why a request about an alarm was refused (the API turns it into JSON)."""

    def __init__(self, status: int, reason: str, detail: Any, state: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail, self.state = status, reason, detail, state


def matches(rule: AlarmRule, result: dict) -> bool:
    """Whether one result counts for ``rule``: its label is one of the rule's, its
    score at least ``min_score``."""
    try:
        return str(result.get("label")) in rule.labels and \
            float(result.get("score", 0.0)) >= rule.min_score
    except (TypeError, ValueError):
        return False


@dataclass
class Active:
    """An open or acknowledged alarm as the engine tracks it."""

    alarm_id: str
    rule: str
    stream: str
    app: str
    label: str
    score: float
    raised_at: float
    last_seen: float
    frames: int
    has_evidence: bool = False
    dirty: bool = False  #: last_seen / frames changed since they were stored


class Engine:
    """N of the last M frames, one active alarm per (rule, stream), clear, latch,
    cooldown. Not thread-safe: the caller holds a lock."""

    def __init__(self, rules: list[AlarmRule],
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.rules = {r.name: r for r in rules}
        self._by_app: dict[str, list[AlarmRule]] = {}
        for r in rules:
            self._by_app.setdefault(r.app, []).append(r)
        self._new_id = new_id
        self._windows: dict[tuple[str, str], deque[bool]] = {}
        self.active: dict[tuple[str, str], Active] = {}
        self._quiet_until: dict[tuple[str, str], float] = {}

    def watches(self, app: str) -> bool:
        return app in self._by_app

    def observe(self, stream: str, app: str, result: dict,
                ts: float) -> list[tuple[str, AlarmRule, Active]]:
        """Feed one result; ``("raised" | "seen", rule, alarm)`` for each rule it moved."""
        out = []
        for rule in self._by_app.get(app, ()):
            if rule.stream is not None and rule.stream != stream:
                continue
            key = (rule.name, stream)
            hit = matches(rule, result)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = deque(maxlen=rule.m)
            window.append(hit)
            if not hit:
                continue
            alarm = self.active.get(key)
            if alarm is not None:
                alarm.last_seen = max(alarm.last_seen, ts)
                alarm.frames += 1
                alarm.dirty = True
                out.append(("seen", rule, alarm))
            elif sum(window) >= rule.n and ts >= self._quiet_until.get(key, 0.0):
                alarm = Active(self._new_id(), rule.name, stream, app, str(result.get("label")),
                               float(result.get("score", 0.0)), ts, ts, sum(window))
                self.active[key] = alarm
                out.append(("raised", rule, alarm))
        return out

    def expire(self, now: float) -> list[Active]:
        """The active alarms of unlatched rules with no matching frame for
        ``clear_after_s``: taken out (the caller stores them as cleared)."""
        gone = []
        for key, alarm in list(self.active.items()):
            rule = self.rules.get(alarm.rule)
            if rule is None or rule.latch or now - alarm.last_seen < rule.clear_after_s:
                continue
            gone.append(self._end(key, now))
        return gone

    def end(self, alarm_id: str, now: float) -> Active | None:
        """Someone handled the alarm (resolved, false alarm): it is active no more."""
        for key, alarm in list(self.active.items()):
            if alarm.alarm_id == alarm_id:
                return self._end(key, now)
        return None

    def _end(self, key: tuple[str, str], now: float) -> Active:
        rule = self.rules.get(key[0])
        if rule is not None and rule.cooldown_s:
            self._quiet_until[key] = now + rule.cooldown_s
        return self.active.pop(key)

    def restore(self, alarm: Active) -> None:
        """An alarm still active in the database (after a restart)."""
        self.active[(alarm.rule, alarm.stream)] = alarm


class Alarms:
    def __init__(self, cfg: AlarmsConfig, store: NodeStore, capture: Capture,
                 classes: Callable[[str, int], list[str]], emit_event: Callable[..., None],
                 evidence_dir: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.capture = capture
        self.classes = classes
        self.emit_event = emit_event
        self.dir = evidence_dir
        self.engine = Engine(cfg.rules)
        self.stats_n: Counter[str] = Counter()
        self.raised: Counter[str] = Counter()  #: per rule, since the agent started
        self.false: Counter[str] = Counter()
        self._lock = threading.Lock()  # the engine
        self._q: queue.Queue[tuple | None] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.send_unsent()
        for r in self.store.query_alarms(ACTIVE, limit=100_000):
            self.engine.restore(Active(r["alarm_id"], r["rule"], r["stream"], r["app"],
                                       r["label"], r["score"], r["raised_at"], r["last_seen"],
                                       r["frames"], has_evidence=bool(r["evidence_path"])))
        self._thread = threading.Thread(target=self._run, name="alarms", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(10)
            self._thread = None

    # -- a stream's result (its result thread: decide, copy the frame, queue) ---------
    def observe(self, stream: str, app: str, version: str, result: dict, ts: float,
                frame: Callable[[], np.ndarray | None] | None = None) -> None:
        if not self.engine.watches(app):
            return
        with self._lock:
            moved = []
            for what, rule, alarm in self.engine.observe(stream, app, result, ts):
                moved.append((what, rule, alarm, not alarm.has_evidence))
                alarm.has_evidence = True  # this frame is taken (a gone one is said below)
        for what, rule, alarm, take in moved:
            pixels = frame() if take and frame is not None else None
            if what == "raised":
                self._put(("raised", rule, alarm, version, result, pixels, ts))
            elif pixels is not None:  # the raising frame was gone: this one shows it
                self._put(("evidence", alarm.alarm_id, pixels, ts))
            elif take and frame is not None:
                self._no_evidence(alarm.alarm_id)

    def _put(self, item: tuple) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:  # the writer is stuck (disk?): counted, never waited for
            self.stats_n["dropped"] += 1
            logger.error("alarms: writer queue full, %s dropped", item[0])

    # -- the writer thread ---------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        while True:
            try:
                item = self._q.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                self._guard(self._flush)
                return
            if item:
                self._guard(self._write, item)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK
                self._guard(self._tick)

    def _guard(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the writer must outlive a bad write
            self.stats_n["errors"] += 1
            logger.exception("alarms: %s failed", getattr(fn, "__name__", fn))

    def _write(self, item: tuple) -> None:
        if item[0] == "raised":
            _, rule, alarm, version, result, pixels, ts = item
            path = self._evidence(alarm.alarm_id, pixels)
            if path is None:
                self._no_evidence(alarm.alarm_id)
            self.store.add_alarm({
                "alarm_id": alarm.alarm_id, "rule": rule.name, "stream": alarm.stream,
                "app": alarm.app, "version": version, "severity": rule.severity,
                "state": "open", "label": alarm.label, "score": alarm.score,
                "result": json.dumps(result), "raised_at": alarm.raised_at,
                "last_seen": alarm.last_seen, "frames": alarm.frames,
                "evidence_path": str(path) if path else None,
                "evidence_ts": ts if path else None,
                "history": json.dumps([{"state": "open", "at": time.time(), "by": None}])})
            self.raised[rule.name] += 1
            logger.warning("alarm %s raised: rule %s, stream %s, %s (%.2f)", alarm.alarm_id,
                           rule.name, alarm.stream, alarm.label, alarm.score)
            self._event("alarm_raised", rule.severity, self.store.get_alarm(alarm.alarm_id),
                        by=None)
            for old in self.store.prune_alarms(self.cfg.max_stored):
                Path(old).unlink(missing_ok=True)
        elif item[0] == "evidence":
            _, alarm_id, pixels, ts = item
            path = self._evidence(alarm_id, pixels)
            self.store.set_alarm_fields(alarm_id, evidence_path=str(path), evidence_ts=ts)

    def _no_evidence(self, alarm_id: str) -> None:
        """The frame was overwritten before it was copied: the next matching one is taken."""
        self.stats_n["evidence_gone"] += 1
        with self._lock:
            for a in self.engine.active.values():
                if a.alarm_id == alarm_id:
                    a.has_evidence = False

    def _evidence(self, alarm_id: str, pixels: np.ndarray | None) -> Path | None:
        if pixels is None:
            return None
        path = self.dir / f"{alarm_id}.png"
        path.write_bytes(frame_png(pixels))
        return path

    def _tick(self) -> None:
        now = time.time()
        with self._lock:
            cleared = self.engine.expire(now)
        for alarm in cleared:
            moved, row = self.store.transition_alarm(
                alarm.alarm_id, ACTIVE, "cleared",
                {"closed_at": now, "last_seen": alarm.last_seen, "frames": alarm.frames},
                {"state": "cleared", "at": now, "by": None})
            if moved:
                self.stats_n["cleared"] += 1
                self._event("alarm_cleared", "info", row, by=None)
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            dirty = [(a.alarm_id, a.last_seen, a.frames) for a in self.engine.active.values()
                     if a.dirty]
            for a in self.engine.active.values():
                a.dirty = False
        for alarm_id, last_seen, frames in dirty:
            self.store.touch_alarm(alarm_id, last_seen, frames)

    def _event(self, type: str, severity: str, row: dict | None, **extra: Any) -> None:
        """The event of the alarm's newest history entry (``row`` as that transition
        left it), then the entry marked sent. Its msg_id comes from the alarm and
        the entry: sent again after a kill -9 in between, it is kept once."""
        if row is None:
            return
        n = len(json.loads(row.get("history") or "[]"))
        if self._emit(type, severity, row, n - 1, row["state"], extra) is False:
            return  # the outbox refused it: sent at the next start
        self.store.mark_alarm_events(row["alarm_id"], n)

    def _emit(self, type: str, severity: str, row: dict, index: int, state: str,
              extra: dict) -> bool | None:
        mid = uuid.uuid5(uuid.NAMESPACE_URL, f"aidc:alarm:{row['alarm_id']}:{index}").hex
        return self.emit_event(type, severity=severity, app=row["app"], data={
            "alarm_id": row["alarm_id"], "rule": row["rule"], "stream": row["stream"],
            "app": row["app"], "label": row["label"], "score": row["score"],
            "state": state, "frames": row["frames"], **extra}, msg_id=mid)

    def send_unsent(self) -> int:
        """Events of alarm transitions committed but never handed to the outbox (the
        agent died in between), rebuilt from the alarm's history; how many."""
        n = 0
        for row in self.store.alarms_unsent():
            history = json.loads(row.get("history") or "[]")
            try:
                for i in range(row.get("events_sent") or 0, len(history)):
                    entry = history[i]
                    state = entry.get("state")
                    extra: dict[str, Any] = {"by": entry.get("by")}
                    if state == "resolved":
                        extra["note"] = entry.get("note")
                    if state == "false_alarm":
                        extra.update(sample_id=row.get("sample_id"),
                                     correct_label=row.get("correct_label"))
                    severity = row["severity"] if state == "open" else "info"
                    if self._emit(EVENTS.get(state, "alarm_" + str(state)),
                                  severity or "info", row, i, state, extra) is False:
                        raise RuntimeError("the outbox refused it")  # next start
                    n += 1
                self.store.mark_alarm_events(row["alarm_id"], len(history))
            except Exception:  # noqa: BLE001 - never stop the node starting; next start
                logger.exception("alarm %s: events not sent", row["alarm_id"])
        if n:
            logger.info("alarms: sent %d events of transitions never queued", n)
        return n

    # -- people (the REST API) ---------------------------------------------------------
    def get(self, alarm_id: str) -> dict:
        row = self.store.get_alarm(alarm_id)
        if row is None:
            raise AlarmError(404, "unknown_alarm", f"no alarm {alarm_id!r}")
        return row

    def evidence(self, alarm_id: str) -> bytes:
        row = self.get(alarm_id)
        if not row["evidence_path"]:
            raise AlarmError(404, "no_evidence", f"alarm {alarm_id!r} has no frame (it was "
                             "overwritten before it could be copied)")
        try:
            return Path(row["evidence_path"]).read_bytes()
        except OSError as err:
            raise AlarmError(410, "evidence_missing", f"the frame of {alarm_id!r} is gone: "
                             f"{err.strerror}") from err

    def act(self, alarm_id: str, action: str, by: str, note: str | None = None,
            label: str | None = None) -> dict:
        """``ack``, ``resolve`` or ``false_alarm``: the alarm row after it.
        :class:`AlarmError`: 404 unknown, 400 bad label, 409 wrong state."""
        from_states, to_state, event = ACTIONS[action]
        row = self.get(alarm_id)
        rule = self.engine.rules.get(row["rule"])
        if action == "false_alarm" and label is not None:
            self._check_label(row, rule, label)
        now = time.time()
        fields: dict[str, Any] = {}
        if action == "ack":
            fields = {"acknowledged_at": now, "acknowledged_by": by}
        else:
            fields = {"closed_at": now, "closed_by": by}
            if note is not None:
                fields["note"] = note
            if label is not None:
                fields["correct_label"] = label
        moved, row = self.store.transition_alarm(
            alarm_id, from_states, to_state, fields,
            {"state": to_state, "at": now, "by": by, **({"note": note} if note else {})})
        if row is None:
            raise AlarmError(404, "unknown_alarm", f"no alarm {alarm_id!r}")
        if not moved:
            raise AlarmError(409, "bad_transition",
                             f"alarm {alarm_id} is {row['state']}; {action} needs "
                             f"{' or '.join(from_states)}", state=row["state"])
        if to_state != "acknowledged":
            with self._lock:
                self.engine.end(alarm_id, now)
        extra: dict[str, Any] = {"by": by}
        if action == "resolve":
            extra["note"] = note
        if action == "false_alarm":
            self.false[row["rule"]] += 1
            extra.update(self._make_sample(row, rule, label, by))
            row = self.get(alarm_id)
        self._event(event, "info", row, **extra)
        return row

    def _check_label(self, row: dict, rule: AlarmRule | None, label: str) -> None:
        classes = self.classes(row["app"], len(json.loads(row["result"] or "{}")
                                                .get("scores") or []))
        if label not in classes:
            raise AlarmError(400, "unknown_label", {"label": label, "classes": classes[:1000]})
        raising = set(rule.labels) if rule is not None else {row["label"]}
        if label in raising:
            raise AlarmError(400, "bad_label", f"{label!r} is what the rule alarms on; a false "
                             "alarm's correct class is another one")

    def _make_sample(self, row: dict, rule: AlarmRule | None, label: str | None,
                     by: str) -> dict:
        """The evidence frame kept as a labelled (or most useful unlabelled) sample."""
        source = "technician"
        if label is None and rule is not None and rule.false_alarm_label is not None:
            n = len(json.loads(row["result"] or "{}").get("scores") or [])
            if rule.false_alarm_label in self.classes(row["app"], n):
                label, source = rule.false_alarm_label, "rule"
            else:
                logger.warning("alarm rule %s: false_alarm_label %r is not a class of %s; "
                               "the frame is kept unlabelled", row["rule"],
                               rule.false_alarm_label, row["app"])
        try:
            png = self.evidence(row["alarm_id"])
        except AlarmError as err:
            return {"sample_id": None, "sample_error": err.detail}
        result = json.loads(row["result"] or "{}")
        kept = self.capture._keep(
            Observation(row["app"], row["version"] or "", "false_alarm", 1.0, result, None, png,
                        row["stream"], time.time()),
            label=label, label_source="false_alarm" if label is not None else None,
            by=by if label is not None else None)
        if kept is None:
            return {"sample_id": None, "sample_error": "the sample quota is full of "
                    "labelled samples"}
        self.store.set_alarm_fields(row["alarm_id"], sample_id=kept["sample_id"],
                                    correct_label=label)
        self.capture.stats["samples_false_alarm"] += 1
        return {"sample_id": kept["sample_id"], "correct_label": label,
                "label_from": source if label is not None else None}

    # -- reading -----------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            open_ = Counter(a.rule for a in self.engine.active.values())
        rules = list(self.engine.rules)
        return {"open": {r: open_.get(r, 0) for r in rules},
                "raised": {r: self.raised.get(r, 0) for r in rules},
                "false": {r: self.false.get(r, 0) for r in rules},
                **dict(self.stats_n)}


def public(row: dict) -> dict:
    """An alarm row as the API shows it (JSON decoded, no local path)."""
    out = {k: v for k, v in row.items() if k != "evidence_path"}
    out["result"] = json.loads(row["result"]) if row.get("result") else None
    out["history"] = json.loads(row["history"]) if row.get("history") else []
    out["evidence_url"] = (f"/api/v1/alarms/{row['alarm_id']}/evidence"
                           if row.get("evidence_path") else None)
    out["sample_url"] = f"/api/v1/samples/{row['sample_id']}" if row.get("sample_id") else None
    return out
