"""Load generation: closed-loop callers and open-loop Poisson arrivals, in separate processes.

Every caller is its own process by default (``mode="process"``, started from a
forkserver that has numpy and onnxruntime preloaded), so a Python client never
shares one GIL with another caller -- what the references need (B1 is one
pinned process per core) and what an HTTP target needs to be loaded at all.
``mode="thread"`` runs callers as threads of this process, for a callable
system under test that cannot be pickled.

One run: each caller pins itself (``cpus``), opens its target, makes a few
warm calls, and waits at a barrier; then all run together for ``warmup_s`` (not
counted) and ``duration_s`` (the window). Throughput counts completions inside
the window; latency is per request, from its start (closed loop) or from its
scheduled arrival (open loop, so queueing delay is counted and a slow server
cannot slow the arrivals down -- no coordinated omission). Open-loop callers of
one group take arrivals from one shared counter: a FIFO queue served by the
group's callers, i.e. an M/G/c system when the callers are the servers (raw
ORT), or a client pool when the target is a server of its own.

Several groups (different targets, different cores) can run in one window:
that is how the two-halves and noisy-neighbour scenarios are built.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: how long a caller may take to open its target and warm up
SETUP_TIMEOUT_S = 180.0
#: open loop: after the window, callers drain the backlog at most this long
DRAIN_S = 2.0


class HarnessError(RuntimeError):
    """A caller could not open its target, or did not report back."""


@dataclass(frozen=True)
class Caller:
    target: Any  #: anything with ``open() -> call`` and ``label`` (see targets.py)
    cpus: tuple[int, ...] | None = None  #: CPU affinity of this caller; None = inherit
    group: str = "main"


@dataclass
class RunResult:
    group: str
    label: str
    callers: int
    duration_s: float
    completed: int  #: completions inside the window
    throughput: float  #: completions per second inside the window
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int = 0
    offered_rate: float | None = None  #: open loop: arrivals per second
    unserved: int = 0  #: open loop: arrivals still waiting when the drain ended
    first_error: str | None = None
    #: cores' worth of CPU used by others (not these callers) during the run, and
    #: hypervisor steal: the noise of a shared machine, to judge a figure by
    foreign_cores: float = float("nan")
    steal_cores: float = float("nan")
    #: cores' worth of CPU used by the callers themselves (process callers), and by
    #: the processes passed as ``own_pids`` (a server and its workers), during the run
    caller_cores: float = float("nan")
    own_cores: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def poisson_arrivals(rate: float, horizon_s: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets (seconds from the start) of a Poisson process up to ``horizon_s``."""
    rng = np.random.default_rng(seed)
    n = int(rate * horizon_s * 1.2 + 50)
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < horizon_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return t[t < horizon_s]


def cpu_jiffies() -> tuple[int, int]:
    """Machine-wide (busy, steal) clock ticks from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6], v[7]


def pids_cpu_s(pids) -> float:
    """CPU seconds (user + system, all threads) the live processes ``pids`` have used."""
    hz, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
    return total


def busy_cores(window_s: float = 0.5) -> float:
    """Cores' worth of CPU busy machine-wide over the next ``window_s``."""
    j0, t0 = cpu_jiffies()[0], time.perf_counter()
    time.sleep(window_s)
    return (cpu_jiffies()[0] - j0) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t0)


class Quiet:
    """A shared machine's noise policy: wait, within a total budget, until other
    processes leave the CPU alone; and how many disturbed runs may be redone."""

    def __init__(self, max_busy: float, budget_s: float, per_wait_s: float = 30.0,
                 retries: int = 0) -> None:
        self.max_busy, self.budget_s, self.per_wait_s = max_busy, budget_s, per_wait_s
        self.waited_s, self.retries_left = 0.0, retries

    def wait(self) -> bool:
        """True once the machine is quiet; False when this wait or the budget ran out."""
        t0 = time.monotonic()
        try:
            while True:
                if busy_cores(0.3) <= self.max_busy:
                    return True
                spent = time.monotonic() - t0
                if spent >= self.per_wait_s or self.waited_s + spent >= self.budget_s:
                    return False
        finally:
            self.waited_s += time.monotonic() - t0


def _tight_timers() -> None:
    """1 us timer slack for this thread (Linux default is 50 us), so sleeps land on time."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


class _MpCounter:
    def __init__(self, ctx) -> None:
        self.v = ctx.Value("q", 0)

    def next(self) -> int:
        with self.v.get_lock():
            i = self.v.value
            self.v.value = i + 1
        return i


class _ThreadCounter:
    def __init__(self) -> None:
        self.i, self.lock = 0, threading.Lock()

    def next(self) -> int:
        with self.lock:
            self.i += 1
            return self.i - 1


class _Box:
    def __init__(self) -> None:
        self.value = 0.0


def _exit_with(pid: int) -> None:
    """In a caller process: exit when the process that started the run is gone."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _caller_main(idx: int, caller: Caller, barrier, start, arrivals: np.ndarray | None,
                 counter, out, warmup_s: float, duration_s: float, warm_calls: int,
                 parent: int | None) -> None:
    now = time.perf_counter  # CLOCK_MONOTONIC on Linux: one clock for all processes
    if parent is not None:
        _exit_with(parent)
    try:
        if caller.cpus:
            os.sched_setaffinity(0, caller.cpus)  # 0 = this thread (this process if single)
        _tight_timers()
        call = caller.target.open()
        for _ in range(warm_calls):
            call()
    except BaseException as err:  # report it, and release everyone from the barrier
        out.put((idx, None, None, 0, f"{type(err).__name__}: {err}", 0.0))
        barrier.abort()
        return
    try:
        barrier.wait(SETUP_TIMEOUT_S)  # everyone is ready ...
        barrier.wait(SETUP_TIMEOUT_S)  # ... and the start time is set
    except threading.BrokenBarrierError:
        return
    t0 = start.value
    cpu0 = time.process_time()
    w, end = t0 + warmup_s, t0 + warmup_s + duration_s
    lat, done, errors, first_error = [], [], 0, None
    while True:
        if arrivals is None:  # closed loop: back to back
            s = now()
            if s >= end:
                break
        else:  # open loop: the next arrival of the group, whoever is free serves it
            i = counter.next()
            if i >= len(arrivals) or arrivals[i] + t0 >= end:
                break
            s = t0 + arrivals[i]
            if now() > end + DRAIN_S:
                break
            while (gap := s - now()) > 0:
                time.sleep(gap)
        try:
            call()
        except Exception as err:  # noqa: BLE001 -- counted, the load goes on
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
            time.sleep(0.001)
            continue
        d = now()
        done.append(d - t0)
        if (arrivals is None and w <= d <= end) or (arrivals is not None and s >= w):
            lat.append(d - s)
    cpu_s = time.process_time() - cpu0
    out.put((idx, np.array(lat) * 1000.0, np.array(done), errors, first_error, cpu_s))


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "onnxruntime"])
    return ctx


def run(callers: list[Caller], duration_s: float, warmup_s: float = 0.5,
        arrivals: dict[str, np.ndarray] | None = None, mode: str = "process",
        warm_calls: int = 3, own_pids: tuple[int, ...] = ()) -> dict[str, RunResult]:
    """Run all ``callers`` in one window; groups named in ``arrivals`` are open loop.

    ``own_pids``: processes that belong to the system under test (a server and
    its workers); their CPU during the run is counted as ours (``own_cores``),
    not as other processes' noise (``foreign_cores``)."""
    arrivals = arrivals or {}
    n = len(callers)
    if mode == "process":
        ctx = _context()
        barrier, start, out = ctx.Barrier(n + 1), ctx.Value("d", 0.0), ctx.Queue()
        counters = {g: _MpCounter(ctx) for g in arrivals}
        spawn = ctx.Process
    elif mode == "thread":
        barrier, start, out = threading.Barrier(n + 1), _Box(), queue.Queue()
        counters = {g: _ThreadCounter() for g in arrivals}
        spawn = threading.Thread
    else:
        raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")
    workers = [spawn(target=_caller_main, daemon=True, name=f"caller-{i}", args=(
        i, c, barrier, start, arrivals.get(c.group), counters.get(c.group), out,
        warmup_s, duration_s, warm_calls, os.getpid() if mode == "process" else None))
        for i, c in enumerate(callers)]
    for wk in workers:
        wk.start()
    reports: dict[int, tuple] = {}
    try:
        barrier.wait(SETUP_TIMEOUT_S)  # all callers opened their targets
        start.value = time.perf_counter() + 0.02  # a common t0, read after the next wait
        jiffies0, own0, wall0 = cpu_jiffies(), pids_cpu_s(own_pids), time.perf_counter()
        barrier.wait(SETUP_TIMEOUT_S)
    except threading.BrokenBarrierError:
        jiffies0, own0, wall0 = cpu_jiffies(), pids_cpu_s(own_pids), time.perf_counter()
    deadline = time.monotonic() + SETUP_TIMEOUT_S + warmup_s + duration_s + DRAIN_S + 60
    while len(reports) < n:
        try:
            rep = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        reports[rep[0]] = rep
        if rep[1] is None:  # a caller failed to open: the barrier is broken, stop
            break
    jiffies1, own1, wall = cpu_jiffies(), pids_cpu_s(own_pids), time.perf_counter() - wall0
    for wk in workers:
        wk.join(timeout=5)
        if mode == "process" and wk.is_alive():
            wk.kill()
    failed = [r[4] for r in reports.values() if r[1] is None]
    if failed or len(reports) < n:
        raise HarnessError(failed[0] if failed else f"{n - len(reports)} callers never reported")
    hz = os.sysconf("SC_CLK_TCK")
    ours = sum(r[5] for r in reports.values()) if mode == "process" else float("nan")
    own = own1 - own0
    foreign = ((jiffies1[0] - jiffies0[0]) / hz - ours - own) / wall
    steal = (jiffies1[1] - jiffies0[1]) / hz / wall
    results = _aggregate(callers, reports, warmup_s, duration_s, arrivals)
    for r in results.values():
        r.foreign_cores, r.steal_cores = max(0.0, foreign), steal
        r.caller_cores, r.own_cores = ours / wall, (own / wall if own_pids else float("nan"))
    return results


def _aggregate(callers, reports, warmup_s, duration_s, arrivals) -> dict[str, RunResult]:
    results = {}
    for group in dict.fromkeys(c.group for c in callers):
        idx = [i for i, c in enumerate(callers) if c.group == group]
        lat = np.concatenate([reports[i][1] for i in idx])
        done = np.concatenate([reports[i][2] for i in idx])
        completed = int(((done >= warmup_s) & (done <= warmup_s + duration_s)).sum())
        pct = np.percentile(lat, [50, 90, 99]) if len(lat) else [float("nan")] * 3
        arr = arrivals.get(group)
        offered = None if arr is None else float(
            ((arr >= warmup_s) & (arr < warmup_s + duration_s)).sum() / duration_s)
        errors = sum(reports[i][3] for i in idx)
        unserved = 0 if arr is None else int(
            ((arr >= warmup_s) & (arr < warmup_s + duration_s)).sum() - len(lat) - errors)
        results[group] = RunResult(
            group=group, label=callers[idx[0]].target.label, callers=len(idx),
            duration_s=duration_s, completed=completed, throughput=completed / duration_s,
            p50_ms=float(pct[0]), p90_ms=float(pct[1]), p99_ms=float(pct[2]),
            mean_ms=float(lat.mean()) if len(lat) else float("nan"),
            max_ms=float(lat.max()) if len(lat) else float("nan"),
            errors=errors, offered_rate=offered,
            unserved=max(0, unserved),
            first_error=next((reports[i][4] for i in idx if reports[i][4]), None))
    return results


def spread(callers: int, cpus: list[int] | None = None) -> list[tuple[int, ...]]:
    """Pin caller i to core i mod cores (round robin over this process's cores)."""
    cores = cpus or sorted(os.sched_getaffinity(0))
    return [(cores[i % len(cores)],) for i in range(callers)]


def closed_loop(target, callers: int = 1, duration_s: float = 3.0, warmup_s: float = 0.5,
                cpus: list[tuple[int, ...] | None] | None = None,
                mode: str = "process") -> RunResult:
    """``callers`` back-to-back callers of one target; ``cpus[i]`` pins caller i."""
    cpus = cpus or [None] * callers
    cs = [Caller(target, cpus[i]) for i in range(callers)]
    return run(cs, duration_s, warmup_s, mode=mode)["main"]


def open_loop(target, rate: float, callers: int, duration_s: float = 3.0,
              warmup_s: float = 0.5, cpus: list[tuple[int, ...] | None] | None = None,
              seed: int = 0, mode: str = "process") -> RunResult:
    """Poisson arrivals at ``rate``/s, served by ``callers`` callers from one FIFO."""
    cpus = cpus or [None] * callers
    cs = [Caller(target, cpus[i]) for i in range(callers)]
    arr = poisson_arrivals(rate, warmup_s + duration_s, seed)
    return run(cs, duration_s, warmup_s, arrivals={"main": arr}, mode=mode)["main"]
