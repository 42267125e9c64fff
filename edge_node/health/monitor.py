"""The monitor: one daemon thread that probes every check at its interval and heals.

On a not-ok finding a fault *episode* opens: the journal gets ``detected``, the
node emits ``fault_detected``, the check's remedy runs, the check is probed again,
and the journal gets ``healed`` (remedy, seconds from detection) or ``unhealed``
(why) with the matching ``fault_healed`` / ``fault_unhealed`` event. While the fault
persists the remedy is retried with backoff (the check's interval doubling, up to
:attr:`Monitor.heal_backoff_max_s`) but nothing is reported per probe: a persisting
fault is re-reported at most every :attr:`Monitor.repeat_s` with its count. The
episode closes with ``fault_healed`` when a probe finds the check ok again
(by a retried remedy or by itself).

Each journal row carries its event, committed with it, and is marked sent once the
event is queued; the event's msg_id comes from the row (phase, kind, check, time).
A kill -9 between the two leaves the row unsent: the agent sends it at its next
start (:meth:`FaultJournal.send_unsent`) under the same msg_id, kept once.

A check that raises is itself a finding (fault ``check_error``), never the end of
the thread; an ``emit_event`` or journal that fails is logged and skipped (a row
whose event was not emitted stays unsent, for the next start).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .base import Check, Finding, HealError
from .journal import accepts_msg_id, emit_events

logger = logging.getLogger(__name__)

EmitEvent = Callable[..., None]  # NodeAgent.emit_event(type, severity=, app=, data=)


@dataclass
class _Episode:
    kind: str
    detected_at: float           # the clock's time
    detail: str
    count: int = 1               # probes that found it
    last_report: float = 0.0     # monotonic
    next_heal: float = 0.0       # monotonic
    heal_delay: float = 0.0
    last_remedy: str | None = None
    last_why: str | None = None
    heal_attempts: int = 0


@dataclass
class _Slot:
    check: Check
    due: float = 0.0             # monotonic
    episode: _Episode | None = None
    last: Finding | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Monitor:
    #: a persisting fault is re-reported (journal ``repeated``, event ``fault_unhealed``)
    #: at most this often
    repeat_s: float = 300.0
    #: the remedy of a persisting fault is retried no less often than this
    heal_backoff_max_s: float = 60.0

    def __init__(self, checks: Iterable[Check], journal: Any, emit_event: EmitEvent | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.emit_event = emit_event
        self._msg_id = accepts_msg_id(emit_event)
        self.clock = clock
        self._slots: dict[str, _Slot] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"probes": 0, "probe_errors": 0, "heals": 0, "heal_errors": 0}
        for c in checks:
            self.add(c)

    # -- the set of checks -----------------------------------------------------
    def add(self, check: Check) -> None:
        if not isinstance(check, Check):
            raise TypeError(f"not a health check: {check!r}")
        if not check.name:
            raise ValueError(f"{type(check).__name__} has no name")
        if not check.interval_s or check.interval_s <= 0:
            raise ValueError(f"check {check.name}: interval_s must be > 0")
        with self._guard:
            if check.name in self._slots:
                raise ValueError(f"a check named {check.name!r} is already monitored")
            self._slots[check.name] = _Slot(
                check, due=time.monotonic() + float(getattr(check, "start_delay_s", 0) or 0))
        self._wake.set()

    @property
    def checks(self) -> list[Check]:
        with self._guard:
            return [s.check for s in self._slots.values()]

    def open_faults(self) -> dict[str, dict[str, Any]]:
        """The episodes open now, by check."""
        with self._guard:
            slots = list(self._slots.values())
        return {s.check.name: {"fault": e.kind, "since": e.detected_at, "count": e.count,
                               "detail": e.detail, "last_remedy": e.last_remedy,
                               "last_why": e.last_why}
                for s in slots if (e := s.episode) is not None}

    def last_findings(self) -> list[Finding]:
        with self._guard:
            return [s.last for s in self._slots.values() if s.last is not None]

    # -- the thread --------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        now = time.monotonic()
        with self._guard:  # start delays count from the start, not from construction
            for s in self._slots.values():
                if s.last is None:
                    s.due = now + float(getattr(s.check, "start_delay_s", 0) or 0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="health-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._guard:
                slots = list(self._slots.values())
            due = [s for s in slots if s.due <= now]
            for s in due:
                if self._stop.is_set():
                    return
                try:
                    self._run_slot(s, heal=True)
                except Exception:  # never the end of the thread
                    logger.exception("health check %s: monitor step failed", s.check.name)
                s.due = time.monotonic() + s.check.interval_s
            with self._guard:
                nxt = min((s.due for s in self._slots.values()), default=now + 1.0)
            self._wake.wait(max(0.0, min(nxt - time.monotonic(), 5.0)))
            self._wake.clear()

    # -- on demand -----------------------------------------------------------------
    def run_all(self, heal: bool = False) -> list[Finding]:
        """Probe every check now. ``heal=False``: only probe (no journal, no events,
        no remedy). ``heal=True``: a not-ok finding is handled as the thread would
        (journal, event, remedy, probe again); returns the findings after healing."""
        with self._guard:
            slots = list(self._slots.values())
        out = []
        for s in slots:
            try:
                out.append(self._run_slot(s, heal=heal, force=True))
            except Exception as err:  # a broken journal must not hide the findings
                logger.exception("health check %s failed", s.check.name)
                out.append(Finding(s.check.name, False, f"monitor error: {err}",
                                   fault="check_error"))
        return out

    # -- one check ----------------------------------------------------------------
    def _probe(self, check: Check) -> Finding:
        self.stats["probes"] += 1
        try:
            f = check.probe()
            if not isinstance(f, Finding):
                raise TypeError(f"probe returned {type(f).__name__}, not a Finding")
        except Exception as err:
            self.stats["probe_errors"] += 1
            logger.warning("health check %s: probe raised %s: %s", check.name,
                           type(err).__name__, err)
            return Finding(check.name, False, f"probe raised {type(err).__name__}: {err}",
                           fault="check_error", data={"error": str(err)})
        if not f.check:
            f.check = check.name
        return f

    def _heal(self, check: Check, finding: Finding) -> tuple[str | None, str | None]:
        """(remedy, None) when applied, (None, why) when not."""
        if finding.fault == "check_error":
            return None, "the check itself failed; no remedy"
        self.stats["heals"] += 1
        try:
            remedy = check.heal(finding)
            return str(remedy or "remedy applied"), None
        except HealError as err:
            return None, str(err) or "no automatic remedy"
        except Exception as err:
            self.stats["heal_errors"] += 1
            logger.exception("health check %s: remedy raised", check.name)
            return None, f"remedy raised {type(err).__name__}: {err}"

    def _run_slot(self, s: _Slot, heal: bool, force: bool = False) -> Finding:
        with s.lock:
            f = self._probe(s.check)
            s.last = f
            if not heal:
                return f
            ep = s.episode
            if f.ok:
                if ep is not None:  # healed by a retried remedy, or by itself
                    s.episode = None
                    self._close(s.check, ep, ep.last_remedy or "recovered by itself", f)
                self._after_ok(s.check, f)
                return f
            now_m = time.monotonic()
            if ep is None:
                ep = s.episode = _Episode(kind=f.kind, detected_at=self.clock(),
                                          detail=f.detail, last_report=now_m,
                                          heal_delay=s.check.interval_s)
                self._report("detected", f.kind, s.check.name, f.detail,
                             ("fault_detected", "warning", self._detected_event(
                                 f.kind, s.check.name, f.detail, ep.detected_at, f.data)),
                             ts=ep.detected_at, data=f.data)
                return self._attempt(s, ep, f, first=True)
            ep.count += 1
            ep.detail = f.detail
            ep.kind = f.kind
            if force or now_m >= ep.next_heal:
                f = self._attempt(s, ep, f, first=False)
                if s.episode is None:
                    return f
            if now_m - ep.last_report >= self.repeat_s:
                ep.last_report = now_m
                ts = self.clock()
                self._report("repeated", ep.kind, s.check.name, ep.detail,
                             ("fault_unhealed", "error",
                              {"fault": ep.kind, "check": s.check.name, "detail": ep.detail,
                               "why": ep.last_why, "count": ep.count, "repeated": True,
                               "detected_at": ep.detected_at,
                               "seconds": round(ts - ep.detected_at, 3)}),
                             ts=ts, count=ep.count)
            return f

    def _attempt(self, s: _Slot, ep: _Episode, f: Finding, first: bool) -> Finding:
        """Apply the remedy, probe again; close the episode when it took."""
        ep.heal_attempts += 1
        remedy, why = self._heal(s.check, f)
        ep.next_heal = time.monotonic() + ep.heal_delay
        ep.heal_delay = min(ep.heal_delay * 2, self.heal_backoff_max_s)
        after = self._probe(s.check) if remedy is not None else f
        s.last = after
        if remedy is not None:
            ep.last_remedy = remedy
        if after.ok:
            s.episode = None
            self._close(s.check, ep, remedy or "recovered by itself", after)
            return after
        why = why or f"still failing after the remedy ({remedy}): {after.detail}"
        ep.last_why = why
        if first:  # the first failed remedy is reported; retries are not, until repeat_s
            self._report("unhealed", ep.kind, s.check.name, why,
                         ("fault_unhealed", "error",
                          {"fault": ep.kind, "check": s.check.name, "detail": after.detail,
                           "why": why, "count": ep.count, "detected_at": ep.detected_at}),
                         count=ep.count)
        return after

    def _close(self, check: Check, ep: _Episode, remedy: str, f: Finding) -> None:
        ts = self.clock()
        secs = max(0.0, ts - ep.detected_at)
        self._report("healed", ep.kind, check.name, remedy,
                     ("fault_healed", "info",
                      {"fault": ep.kind, "check": check.name, "remedy": remedy,
                       "seconds": round(secs, 3), "count": ep.count, "detail": f.detail,
                       "detected_at": ep.detected_at}),
                     ts=ts, seconds=secs, count=ep.count, data=f.data,
                     detected_at=ep.detected_at, detected_detail=ep.detail)

    def _after_ok(self, check: Check, f: Finding) -> None:
        try:
            check.after_ok(f)
        except Exception:
            logger.exception("health check %s: upkeep after an ok probe failed", check.name)

    # -- outputs that must not fail the monitor -------------------------------------
    @staticmethod
    def _detected_event(kind: str, check: str, detail: str, detected_at: float,
                        data: dict | None) -> dict:
        return {"fault": kind, "check": check, "detail": detail, "detected_at": detected_at,
                "data": data}

    def _report(self, phase: str, kind: str, check: str, detail: str,
                event: tuple[str, str, dict], *, ts: float | None = None,
                seconds: float | None = None, count: int = 1, data: dict | None = None,
                detected_at: float | None = None, detected_detail: str = "") -> None:
        """The journal row with its event (one commit), the event emitted under the
        row's msg_id, the row marked sent. A journal that fails does not stop the
        event; an emit that fails leaves the row unsent (sent at the next start)."""
        ts = self.clock() if ts is None else ts
        type, severity, edata = event
        ev = {"type": type, "severity": severity, "data": edata}
        row = None
        if self.journal is not None:
            try:
                if phase == "detected":
                    row = self.journal.detected(kind, check, detail, ts=ts, data=data, event=ev)
                elif phase == "healed":
                    det = None
                    if detected_at is not None:
                        det = {"type": "fault_detected", "severity": "warning",
                               "data": self._detected_event(kind, check, detected_detail,
                                                            detected_at, None)}
                    row = self.journal.healed(kind, check, detail, seconds or 0.0, ts=ts,
                                              count=count, data=data, detected_at=detected_at,
                                              detected_detail=detected_detail, event=ev,
                                              detected_event=det)
                elif phase == "unhealed":
                    row = self.journal.unhealed(kind, check, detail, ts=ts, count=count,
                                                event=ev)
                else:
                    row = self.journal.repeated(kind, check, detail, count=count, ts=ts,
                                                event=ev)
            except Exception:
                logger.exception("fault journal: could not write %s %s", phase, kind)
                row = None
        if self.emit_event is None:
            return
        try:
            emit_events(self.emit_event, phase, kind, check, ts, ev, self._msg_id)
        except Exception:
            logger.exception("health event %s not emitted", type)
            return
        if row is None:
            return
        try:
            self.journal.mark_sent(row)
            again = getattr(row, "rewritten", None)
            if again is not None:  # the detected row written again (node.db restored)
                self.journal.send(again, self.emit_event, self._msg_id)
        except Exception:
            logger.exception("fault journal: %s %s not marked sent", phase, kind)
