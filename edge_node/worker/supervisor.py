"""Start, watch, restart and stop model worker processes.

One process per app key. A worker that dies unexpectedly is restarted (with a
short backoff) at most ``restart_budget[0]`` times within ``restart_budget[1]``
seconds; past that it is marked ``failed`` with the reason and logged at ERROR.
A stop we asked for is never restarted. Each app key keeps one
:class:`WorkerClient` (and socket path and auth key) across restarts, so
holders of the client need not refresh it.

A worker started with :class:`~edge_node.resources.slices.WorkerSettings`
(a slice's CPU affinity, ONNX Runtime threads, provider, env) runs with them;
when they carry a memory budget, the worker's private resident memory is read
every ``memory_poll`` seconds, and a worker over budget is stopped and
restarted with the reason ("memory budget exceeded: 612 MB > 512 MB") in
``last_error``, counted in ``memory_restarts`` and against the restart budget.
With ``memory_poll=None`` the supervisor neither reads nor enforces memory: the
node's ``worker_memory`` health check (edge_node/health/worker_memory.py) does,
over several readings, through :meth:`WorkerSupervisor.recycle`.

:meth:`WorkerSupervisor.recycle` is how a health check restarts a worker that
is alive but wrong (over its memory quota, stuck): the process is stopped
(SIGTERM then SIGKILL, or SIGKILL at once for a process that cannot answer)
and restarted like one that died, against the same restart budget, with the
reason in ``last_error`` and a count under the check's counter.

Every worker is spawned from one long-lived thread: Linux delivers the
worker's parent-death signal (``PR_SET_PDEATHSIG``, set by the worker itself)
when the *thread* that forked it ends, so forking from a short-lived request
thread would kill the worker when that thread returns.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue

from ..resources.slices import WorkerSettings
from .client import WorkerClient
from .errors import WorkerStartError
from .proc import WorkerProc, describe_exit

logger = logging.getLogger(__name__)
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


class _Spawner:
    """A single long-lived thread that runs every Popen."""

    def __init__(self) -> None:
        self._q: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._run, name="worker-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, fut = self._q.get()
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)

    def call(self, fn):
        fut: Future = Future()
        self._q.put((fn, fut))
        return fut.result()


class _Worker:
    def __init__(self, key: str, app_dir: Path, sock: Path, settings: WorkerSettings, env: dict,
                 ready_timeout: float, old: _Worker | None) -> None:
        self.key, self.app_dir, self.socket = key, app_dir, sock
        self.settings, self.env, self.ready_timeout = settings, env, ready_timeout
        # a replaced worker hands on its key and client, so holders of the client keep working
        self.authkey = old.authkey if old is not None else secrets.token_bytes(32)
        self.client = old.client if old is not None else WorkerClient(sock, self.authkey)
        self.proc: WorkerProc | None = None
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self.meta: dict | None = None
        self.rss_mb: int | None = None
        self.memory_restarts = 0
        self.stuck_restarts = 0
        #: (reason, counter) of a recycle asked for: the watcher restarts it with these
        self.recycling: tuple[str, str | None] | None = None
        self.stopping = threading.Event()
        self.restart_times: deque[float] = deque()


class WorkerSupervisor:
    def __init__(self, run_dir: Path, *, restart_budget: tuple[int, float] = (5, 60.0),
                 stop_timeout: float = 5.0, memory_poll: float | None = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_restarts, self.window = restart_budget
        self.stop_timeout = stop_timeout
        self.memory_poll = memory_poll
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._spawner = _Spawner()
        atexit.register(self.stop_all)

    def _socket_for(self, key: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:24]
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        path = self.run_dir / f"{slug}-{digest}.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise WorkerStartError(key, f"socket path {path} is too long for AF_UNIX; "
                                        "use a shorter run dir")
        return path

    def start(self, app_key: str, app_dir: Path, threads: int = 1, env: dict | None = None,
              ready_timeout: float = 60, cpus: list[int] | None = None, *,
              settings: WorkerSettings | None = None) -> WorkerClient:
        """Start (or replace) the worker for ``app_key``; return its client once READY.

        ``settings`` (from :func:`~edge_node.resources.slices.worker_settings`)
        says how it runs: threads, CPU affinity, provider, extra env, memory
        budget; without it, ``threads`` and ``cpus`` (the old way, no budget).
        Raises :class:`WorkerStartError` (state ``failed``, never retried) when
        the first start fails; the restart budget applies to later deaths only.
        Replacing keeps the same client object and socket path.
        """
        if settings is None:
            settings = WorkerSettings(threads=threads, cpus=tuple(cpus) if cpus else None)
        elif threads != 1 or cpus is not None:
            raise ValueError("pass threads and cpus inside settings, not beside it")
        with self._lock:
            old = self._workers.get(app_key)
        if old is not None:
            logger.info("replacing the worker %s (%s)", app_key, old.state)
            self.stop(app_key)
        w = _Worker(app_key, Path(app_dir), self._socket_for(app_key), settings,
                    {**settings.env, **(env or {})}, ready_timeout, old)
        with self._lock:
            self._workers[app_key] = w
        return self._launch_client(w)

    def _launch_client(self, w: _Worker) -> WorkerClient:
        """:meth:`_launch`, the worker marked stopped or failed when it does not start."""
        try:
            self._launch(w)
        except WorkerStartError as err:
            w.state = "stopped" if w.stopping.is_set() else "failed"
            w.last_error = err.reason
            raise
        return w.client

    def _launch(self, w: _Worker) -> None:
        """Spawn and wait for READY; on success the worker is ``ready`` and watched."""
        cmd = [sys.executable, "-m", "edge_node.worker", "--app-dir", str(w.app_dir),
               "--socket", str(w.socket), *w.settings.argv()]
        env = {**os.environ, **w.env, "AIDC_WORKER_AUTHKEY": w.authkey.hex(),
               "AIDC_WORKER_PARENT_PID": str(os.getpid())}
        with self._lock:
            if w.stopping.is_set():
                raise WorkerStartError(w.key, "stopped while starting")
            w.proc = proc = self._spawner.call(lambda: WorkerProc.spawn(w.key, cmd, env))
        meta = proc.wait_ready(w.ready_timeout)
        threading.Thread(target=self._watch, args=(w, proc), name=f"watch-{w.key}",
                         daemon=True).start()
        with self._lock:
            w.meta = meta
            if not w.stopping.is_set():
                w.state = "ready"
        logger.info("worker %s ready (pid %d)", w.key, proc.pid)

    def _over_budget(self, w: _Worker, proc: WorkerProc) -> str | None:
        if self.memory_poll is None:
            return None
        w.rss_mb = rss = proc.rss_mb()
        budget = w.settings.memory_mb
        if budget is None or rss is None or rss <= budget or w.stopping.is_set():
            return None
        return f"memory budget exceeded: {rss} MB > {budget} MB"

    def _watch(self, w: _Worker, proc: WorkerProc) -> None:
        """Wait for the worker to exit, reading its memory meanwhile; restart it if it
        died on its own or went over its memory budget."""
        over = None
        while (rc := proc.wait_exit(self.memory_poll)) is None:
            over = self._over_budget(w, proc)
            if over is not None:
                logger.warning("worker %s (pid %d): %s; restarting it", w.key, proc.pid, over)
                rc = proc.stop(self.stop_timeout)
                break
        with self._lock:
            if w.stopping.is_set() or w.proc is not proc:
                return
            recycled, w.recycling = w.recycling, None
            if recycled is not None:  # a health check stopped it: its reason, its counter
                over, counter = recycled
                if counter:
                    setattr(w, counter, getattr(w, counter) + 1)
            elif over is not None:
                w.memory_restarts += 1
            w.state, w.last_error = "restarting", over or describe_exit(rc, proc.tail())
        if over is None:
            logger.warning("worker %s (pid %d) died unexpectedly: %s", w.key, proc.pid,
                           w.last_error)
        self._restart_loop(w)

    def _restart_loop(self, w: _Worker) -> None:
        delay = 0.2
        while True:
            with self._lock:
                if w.stopping.is_set():
                    return
                now = time.monotonic()
                while w.restart_times and now - w.restart_times[0] > self.window:
                    w.restart_times.popleft()
                if len(w.restart_times) >= self.max_restarts:
                    w.state = "failed"
                    logger.error("worker %s FAILED: %d restarts within %gs used up; giving up. "
                                 "Last error: %s", w.key, self.max_restarts, self.window,
                                 w.last_error)
                    return
                w.restart_times.append(now)
                w.restarts += 1
            if w.stopping.wait(delay):
                return
            try:
                self._launch(w)
                return
            except WorkerStartError as err:
                w.last_error = err.reason
                logger.warning("restart %d of worker %s failed: %s", w.restarts, w.key, err.reason)
                delay = min(delay * 2, 5.0)

    def restart(self, app_key: str) -> WorkerClient:
        """Stop the worker for ``app_key`` and start it again as it was (same model,
        settings, socket and client object); KeyError for a worker never started.
        The new worker takes the key before the old one stops, so the app never
        looks stopped (which would make the reconciler start one of its own)."""
        with self._lock:
            old = self._workers[app_key]
            w = _Worker(app_key, old.app_dir, old.socket, old.settings, old.env,
                        old.ready_timeout, old)
            old.stopping.set()
            proc = old.proc
            self._workers[app_key] = w
        if proc is not None:
            proc.terminate()
            proc.stop(self.stop_timeout)
        old.state = "stopped"
        w.client.close()  # connections to the old process; reopened to the new one
        logger.info("worker %s restarting", app_key)
        return self._launch_client(w)

    def recycle(self, app_key: str, reason: str, *, counter: str | None = None,
                kill: bool = False, pid: int | None = None) -> bool:
        """Stop a live worker that is wrong (over its memory quota, stuck) and let it
        be restarted like one that died: same client, against the restart budget,
        ``reason`` in ``last_error``, one more in ``counter`` (``"memory_restarts"``
        or ``"stuck_restarts"``). SIGTERM and up to ``stop_timeout`` before SIGKILL;
        ``kill``: SIGKILL at once (a stopped or deadlocked process cannot answer
        SIGTERM). ``pid``: only if that is still the worker's process. Returns
        False when there was nothing to stop (gone, stopped, already restarting).
        The restart happens on the worker's watch thread; this returns once the
        old process is gone."""
        if counter not in (None, "memory_restarts", "stuck_restarts"):
            raise ValueError(f"unknown counter {counter!r}")
        with self._lock:
            w = self._workers.get(app_key)
            if w is None or w.stopping.is_set() or w.state != "ready" or w.proc is None \
                    or not w.proc.alive() or w.recycling is not None:
                return False
            proc = w.proc
            if pid is not None and proc.pid != pid:
                return False
            w.recycling = (reason, counter)
            w.state = "restarting"
        logger.warning("worker %s (pid %d): %s; restarting it", app_key, proc.pid, reason)
        if kill:
            proc.kill()
            proc.wait_exit(self.stop_timeout)
        else:
            proc.stop(self.stop_timeout)
        return True

    def stop(self, app_key: str) -> None:
        """Stop the worker for ``app_key`` (SIGTERM, then SIGKILL); it stays ``stopped``."""
        self._stop_many([app_key])

    def stop_all(self) -> None:
        """Stop every worker, in parallel; no worker process is left afterwards."""
        with self._lock:
            keys = list(self._workers)
        self._stop_many(keys)

    def _stop_many(self, keys: list[str]) -> None:
        procs = []
        with self._lock:
            for key in keys:
                w = self._workers.get(key)
                if w is None:
                    continue
                w.stopping.set()
                if w.proc is not None:
                    w.proc.terminate()
                    procs.append((w, w.proc))
        deadline = time.monotonic() + self.stop_timeout
        for _, proc in procs:
            proc.stop(max(0.1, deadline - time.monotonic()))
        with self._lock:
            for key in keys:
                w = self._workers.get(key)
                if w is not None:
                    if w.state != "stopped":
                        logger.info("worker %s stopped", key)
                    w.state = "stopped"
                    w.client.close()

    def status(self) -> dict[str, dict]:
        with self._lock:
            if self.memory_poll is None:  # not polled: read now (one small /proc file each)
                for w in self._workers.values():
                    w.rss_mb = w.proc.rss_mb() if w.proc is not None and w.proc.alive() \
                        else None
            return {
                key: {"state": w.state,
                      "pid": w.proc.pid if w.proc is not None and w.proc.alive() else None,
                      "restarts": w.restarts, "last_error": w.last_error,
                      "memory_budget_mb": w.settings.memory_mb, "rss_mb": w.rss_mb,
                      "memory_restarts": w.memory_restarts,
                      "stuck_restarts": w.stuck_restarts,
                      "runtime": (w.meta or {}).get("runtime")}
                for key, w in self._workers.items()
            }

    def output_tail(self, app_key: str, n: int = 100) -> str:
        """The last ``n`` lines the worker process wrote to stderr ("" if none)."""
        with self._lock:
            w = self._workers.get(app_key)
            proc = w.proc if w is not None else None
        return proc.tail(n) if proc is not None else ""

    def client(self, app_key: str) -> WorkerClient | None:
        """The app's client unless its worker is stopped or failed (or unknown)."""
        with self._lock:
            w = self._workers.get(app_key)
            return w.client if w is not None and w.state not in ("stopped", "failed") else None

    def meta(self, app_key: str) -> dict | None:
        """The worker's READY metadata (inputs/outputs in v2 naming), if it came up."""
        with self._lock:
            w = self._workers.get(app_key)
            return w.meta if w is not None else None
