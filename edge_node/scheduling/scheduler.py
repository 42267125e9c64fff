"""Time division: run training jobs when a window or idle inference allows, preempt
them when the window closes or inference needs the capacity back.

One pass (:meth:`Scheduler.tick`), every ``tick_s`` and at each window boundary:

1. reap exited jobs (done, preempted, failed) and SIGKILL any whose grace is over;
2. per card with work: sample ``inference_load(card)`` into the card's
   :class:`~.load.LoadGate`, work out the grant (the largest of: a reserved
   window, a yielding window while inference is not busy, ``idle_fraction``
   while inference is idle), then preempt the running job if the grant fell
   below what it was given, or start the next runnable job if the card is free.

At most one job runs per card. Everything the node needs is injected: the
load, the cores a fraction maps to, extra env for a card (GPU), the event sink
and the clock.

:meth:`Scheduler.pause` holds all training off whatever the windows say (the
``memory_pressure`` health check sheds load with it): running jobs are
preempted as a closing window would (SIGTERM, grace, checkpoint; they resume
later), none starts until :meth:`Scheduler.resume`. :meth:`Scheduler.wake` runs
a pass now (the ``clock`` health check, after the wall clock jumped).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .clock import Clock, SystemClock
from .config import ScheduleConfig
from .jobs import JobRecord, JobRegistry
from .load import LoadGate
from .runner import JobProcess, describe_exit, job_env, kill_orphan
from cloud_sync.windows import TrainingWindow, WindowTable

logger = logging.getLogger(__name__)
EventSink = Callable[[str, dict], None]
EVENTS = ("job_started", "job_resumed", "job_preempted", "job_done", "job_failed")
_TERM_CODES = (0, 128 + signal.SIGTERM, -signal.SIGTERM)


def default_training_cores(card_id: str, fraction: float) -> list[int]:
    """The CPU card's last ``ceil(fraction * n)`` usable cores (inference packs from
    the first); no cores for other cards. The resource manager should replace it."""
    if card_id != "cpu":
        return []
    cores = sorted(os.sched_getaffinity(0))
    return cores[-max(1, math.ceil(fraction * len(cores) - 1e-9)):]


class Scheduler:
    def __init__(self, registry: JobRegistry, config: ScheduleConfig, *,
                 inference_load: Callable[[str], float],
                 training_cores: Callable[[str, float], list[int]] = default_training_cores,
                 card_env: Callable[[str, float], dict[str, str]] | None = None,
                 on_event: EventSink | None = None, clock: Clock | None = None) -> None:
        self.registry = registry
        self.inference_load = inference_load
        self.training_cores = training_cores
        self.card_env = card_env
        self.on_event = on_event or (lambda type, data: None)
        self.clock = clock or SystemClock()
        self.stats: Counter[str] = Counter()
        self._cfg = config
        self._table = WindowTable(config.windows, config.timezone)
        self.windows_source = "config"  # or "cloud": who set the windows in force
        self._gates: dict[str, LoadGate] = {}
        self._procs: dict[str, JobProcess] = {}  # card -> its running job
        self._basis: dict[str, str] = {}  # card -> "window" | "idle"
        self._progress: dict[str, dict] = {}
        self._persisted: dict[str, float] = {}
        self._cancelled: set[str] = set()
        self._paused: str | None = None  # why training is held off (pause/resume)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- configuration -----------------------------------------------------
    def set_config(self, config: ScheduleConfig) -> None:
        with self._lock:
            self._cfg = config
            self._table = WindowTable(config.windows, config.timezone)
            for gate in self._gates.values():
                gate.policy = config.load
        self._wake.set()

    def set_windows(self, windows: Sequence[TrainingWindow], timezone: str | None,
                    source: str = "config") -> None:
        """Replace the windows and time zone (e.g. from the cloud); the rest stays.
        ``source`` says where they came from ("config" or "cloud"), for status."""
        with self._lock:
            self.windows_source = source
            self.set_config(ScheduleConfig.model_validate({
                **self._cfg.model_dump(), "timezone": timezone,
                "windows": [w.model_dump() for w in windows]}))

    def windows_in_force(self) -> dict[str, Any]:
        """{"source": "config" | "cloud", "timezone": ..., "windows": [...]}"""
        with self._lock:
            return {"source": self.windows_source, "timezone": self._cfg.timezone,
                    "windows": [w.model_dump() for w in self._cfg.windows]}

    def pause(self, reason: str) -> bool:
        """Hold every training job off until :meth:`resume`: running ones are
        preempted (resumed later from their checkpoint), none starts. True when
        it was not paused before."""
        with self._lock:
            was, self._paused = self._paused, reason
            if was is None:
                self.stats["pauses"] += 1
                logger.warning("training paused: %s", reason)
        self._wake.set()
        return was is None

    def resume(self) -> bool:
        """Let training run again as the windows and load allow; True when it was paused."""
        with self._lock:
            was, self._paused = self._paused, None
            if was is not None:
                logger.info("training resumed (was paused: %s)", was)
        self._wake.set()
        return was is not None

    @property
    def paused(self) -> str | None:
        """Why training is held off, or None."""
        return self._paused

    def wake(self) -> None:
        """Run a pass now and work out the next window boundary afresh."""
        self._wake.set()

    # -- life cycle ----------------------------------------------------------
    def start(self) -> None:
        """Recover jobs a previous run left ``running``, then schedule in a thread."""
        for rec in self.registry.list(("running",)):
            if rec.pid:
                kill_orphan(rec.pid, rec.job_id, self._cfg.grace_s)
            self.registry.transition(rec.job_id, "preempted", "agent restarted")
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.tick()
                wait = self._sleep_for()
            except Exception:  # one bad pass must not end time division
                self.stats["tick_errors"] += 1
                logger.exception("scheduler pass failed")
                wait = self._cfg.tick_s
            self._wake.wait(wait)

    def _sleep_for(self) -> float:
        now = self.clock.now()
        nxt = min((self._table.next_change(c, now) for c in self.registry.cards_with_work()),
                  default=None)
        left = (nxt - now).total_seconds() if nxt else self._cfg.tick_s
        return max(0.01, min(self._cfg.tick_s, left))

    def stop(self) -> None:
        """Stop scheduling and preempt every running job (SIGTERM, grace, SIGKILL);
        returns when no job process is left. A stopped scheduler stays stopped."""
        self._stopping.set()
        self._wake.set()
        if self._thread:
            self._thread.join(self._cfg.tick_s + 30)
        with self._lock:
            for proc in self._procs.values():
                proc.terminate("node stopping", self._cfg.grace_s)
            give_up = time.monotonic() + self._cfg.grace_s + 10
            while self._procs and time.monotonic() < give_up:
                for card, proc in list(self._procs.items()):
                    rc = proc.poll()
                    if rc is not None:
                        self._reap(card, proc, rc)
                    else:
                        proc.kill_if_overdue()
                time.sleep(0.02)
            for proc in self._procs.values():  # unkillable (D state): say so, loudly
                logger.error("training job %s (pid %d) did not exit even after SIGKILL",
                             proc.job_id, proc.pid)

    # -- one pass ------------------------------------------------------------
    def tick(self) -> None:
        """One scheduling pass; does nothing once :meth:`stop` has been called."""
        with self._lock:
            if self._stopping.is_set():
                return
            now, mono = self.clock.now(), self.clock.monotonic()
            for card, proc in list(self._procs.items()):
                rc = proc.poll()
                if rc is not None:
                    self._reap(card, proc, rc)
                elif proc.kill_if_overdue():
                    self.stats["kills"] += 1
            if not self._cfg.enabled or self._paused is not None:
                why = "scheduling disabled" if not self._cfg.enabled else \
                    f"training paused: {self._paused}"
                for proc in self._procs.values():
                    if proc.stop_reason is None:
                        self.stats["preemptions"] += self._paused is not None
                    proc.terminate(why, self._cfg.grace_s)
                return
            for card in sorted(self.registry.cards_with_work() | set(self._procs)):
                gate = self._gates.setdefault(card, LoadGate(card, self._cfg.load))
                gate.sample(self._load(card), mono)
                fraction, basis, why = self._grant(card, now, gate, mono)
                proc = self._procs.get(card)
                if proc is None:
                    if fraction > 0:
                        self._start_next(card, fraction, basis)
                elif proc.stop_reason is None:
                    if fraction + 1e-9 < proc.fraction:
                        self.stats["preemptions"] += 1
                        proc.terminate(why, self._cfg.grace_s)
                    else:
                        self._basis[card] = basis

    def _load(self, card: str) -> float:
        try:
            return min(1.0, max(0.0, float(self.inference_load(card))))
        except Exception:  # unknown load: assume inference needs the card
            self.stats["load_errors"] += 1
            logger.warning("inference_load(%s) failed; treating the card as busy", card,
                           exc_info=True)
            return 1.0

    def _grant(self, card: str, now, gate: LoadGate, mono: float) -> tuple[float, str, str]:
        """(fraction, basis, reason it is not more) for the card at ``now``."""
        active = self._table.active(card, now)
        reserved = max((w.training_fraction for w in active if not w.yield_to_inference),
                       default=0.0)
        yielding = max((w.training_fraction for w in active if w.yield_to_inference),
                       default=0.0)
        p = self._cfg.load
        idle = p.idle_fraction if p.train_when_idle and not gate.busy and (
            gate.idle_at(mono) or self._basis.get(card) == "idle") else 0.0
        window = max(reserved, 0.0 if gate.busy else yielding)
        fraction = max(window, idle)
        if gate.busy:
            why = f"inference busy (load {gate.last:.2f} >= {p.busy_above:g})"
        elif not active:
            why = "outside training windows"
        else:
            why = f"training share now {fraction:g}"
        return fraction, ("window" if window >= idle else "idle"), why

    def _start_next(self, card: str, fraction: float, basis: str) -> None:
        job = self.registry.next_runnable(card)
        if job is None:
            return
        try:
            cores = sorted(self.training_cores(card, fraction))
            if not set(cores) <= os.sched_getaffinity(0):
                raise ValueError(f"cores {cores} are not all usable here")
        except Exception as err:
            self.stats["cores_errors"] += 1
            logger.warning("no cores for training on %s (%.2f): %s", card, fraction, err)
            return
        resume = job.starts > 0
        env = job_env(job.job_id, card, fraction, cores, job.checkpoint_dir, resume, job.spec.env)
        if self.card_env:
            env.update(self.card_env(card, fraction))
        job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._progress[job.job_id] = dict(job.progress)  # before the pump can write to it
        try:
            proc = JobProcess.spawn(job.job_id, job.spec.argv(job.checkpoint_dir, resume), env,
                                    job.job_dir, cores, fraction, self._on_message)
        except OSError as err:
            self._finish(job, "failed", f"cannot start: {err}")
            return
        self._procs[card] = proc
        self._basis[card] = basis
        self.registry.transition(job.job_id, "running", basis, starts=1, pid=proc.pid)
        self._emit("job_resumed" if resume else "job_started", job, fraction=fraction,
                   cores=cores, basis=basis)

    # -- progress and exits --------------------------------------------------
    def _on_message(self, job_id: str, msg: dict) -> None:
        """A JSON line from a job's stdout (pump thread)."""
        prog = self._progress.get(job_id)
        if prog is None:  # a late line after the job was reaped: its record is final
            return
        if msg.get("event") == "checkpoint":
            prog["checkpoint_step"] = msg.get("step")
        elif msg.get("event") == "resumed":
            prog["resumed_from"] = msg.get("step")
        else:
            prog.update({k: v for k, v in msg.items() if k != "event"})
        if msg.get("event") != "progress" or \
                time.monotonic() - self._persisted.get(job_id, 0.0) > 5.0:
            self._persisted[job_id] = time.monotonic()
            self.registry.set_progress(job_id, dict(prog))

    def _reap(self, card: str, proc: JobProcess, rc: int) -> None:
        del self._procs[card]
        self._basis.pop(card, None)
        job = self.registry.get(proc.job_id)
        if job.state != "running" or job.pid != proc.pid:  # not ours any more (recovered
            # by another scheduler on this database)
            logger.warning("training job %s exited (%s) but is %s; leaving it", job.job_id,
                           describe_exit(rc), job.state)
            return
        self.registry.set_progress(job.job_id, dict(self._progress.get(job.job_id, {})))
        if job.job_id in self._cancelled:
            self._cancelled.discard(job.job_id)
            self._finish(job, "failed", "cancelled")
        elif rc == 0 and (proc.done_reported or proc.stop_reason is None):
            self._finish(job, "done", None)
        elif proc.stop_reason is not None and (rc in _TERM_CODES or rc < 0):
            reason = proc.stop_reason
            if proc.killed:
                reason += f"; ignored SIGTERM, killed after {self._cfg.grace_s:g}s"
            self.registry.transition(job.job_id, "preempted", reason, preemptions=1,
                                     kills=int(proc.killed))
            self._emit("job_preempted", job, reason=reason, killed=proc.killed, exit_code=rc)
            self._progress.pop(job.job_id, None)
        else:
            self._finish(job, "failed", describe_exit(rc, proc.tail()))

    def _finish(self, job: JobRecord, state: str, reason: str | None) -> None:
        self.registry.transition(job.job_id, state, reason)
        self._emit("job_done" if state == "done" else "job_failed", job, reason=reason)
        self._progress.pop(job.job_id, None)
        self._persisted.pop(job.job_id, None)

    def _emit(self, type: str, job: JobRecord, **data: Any) -> None:
        payload = {"job_id": job.job_id, "name": job.spec.name, "card": job.spec.card,
                   "progress": dict(self._progress.get(job.job_id, job.progress)), **data}
        try:
            self.on_event(type, payload)
        except Exception:
            logger.exception("on_event(%s) failed", type)

    # -- operator actions and status -------------------------------------------
    def cancel(self, job_id: str) -> None:
        """Stop a job for good (``failed``, reason ``cancelled``)."""
        with self._lock:
            for proc in self._procs.values():
                if proc.job_id == job_id:
                    self._cancelled.add(job_id)
                    proc.terminate("cancelled", self._cfg.grace_s)
                    return
            self._finish(self.registry.get(job_id), "failed", "cancelled")

    def running(self) -> dict[str, int]:
        """job id -> pid of every job process now running."""
        with self._lock:
            return {p.job_id: p.pid for p in self._procs.values()}

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock.now()
            cards = {}
            for card, gate in self._gates.items():
                proc = self._procs.get(card)
                cards[card] = {
                    "load": gate.last, "inference_busy": gate.busy,
                    "window_fraction": self._table.allowed_fraction(card, now),
                    "next_window_change": self._table.next_change(card, now).isoformat(),
                    "job": proc.job_id if proc else None, "pid": proc.pid if proc else None,
                    "granted_fraction": proc.fraction if proc else 0.0,
                    "cores": proc.cores if proc else []}
            return {"enabled": self._cfg.enabled, "paused": self._paused,
                    "timezone": self._cfg.timezone,
                    "windows_source": self.windows_source,
                    "windows": [w.model_dump() for w in self._cfg.windows],
                    "cards": cards, "stats": dict(self.stats),
                    "jobs": [j.to_dict() for j in self.registry.list()[-50:]]}
