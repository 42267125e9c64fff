"""One training job's OS process: spawn pinned, read its progress, stop it.

The process gets a session (and process group) of its own, so SIGTERM and
SIGKILL reach any children it starts, and a Ctrl-C at the agent's terminal does
not. Its CPU affinity is set *before* it runs a single instruction: the
spawning thread narrows its own mask, forks (the child inherits the calling
thread's mask) and restores it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
_spawn_lock = threading.Lock()


def describe_exit(rc: int | None, tail: str = "") -> str:
    """``"exited with code 3: ValueError: boom"`` from a return code and stderr."""
    if rc is None:
        why = "still running"
    elif rc < 0:
        try:
            why = f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            why = f"killed by signal {-rc}"
    else:
        why = f"exited with code {rc}"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return f"{why}: {lines[-1][:300]}" if lines else why


def job_env(job_id: str, card: str, fraction: float, cores: list[int], checkpoint_dir: Path,
            resume: bool, extra: dict[str, str]) -> dict[str, str]:
    """The environment of the protocol (see :mod:`.jobs`) over the agent's own."""
    threads = str(max(1, len(cores)))
    return {**os.environ, **extra,
            "AIDC_JOB_ID": job_id, "AIDC_JOB_CARD": card, "AIDC_JOB_FRACTION": f"{fraction:g}",
            "AIDC_JOB_CORES": threads, "AIDC_JOB_CPUS": ",".join(map(str, cores)),
            "AIDC_JOB_CHECKPOINT_DIR": str(checkpoint_dir),
            "AIDC_JOB_RESUME": "1" if resume else "0", "AIDC_JOB_PARENT_PID": str(os.getpid()),
            "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads}


class JobProcess:
    """A running job and the threads that read its stdout and stderr."""

    def __init__(self, job_id: str, popen: subprocess.Popen, cores: list[int],
                 fraction: float, on_message: Callable[[str, dict], None]) -> None:
        self.job_id = job_id
        self.popen = popen
        self.pid = popen.pid
        self.cores = cores
        self.fraction = fraction
        self.on_message = on_message
        self.done_reported = False
        self.stop_reason: str | None = None
        self.stop_deadline: float | None = None
        self.killed = False
        self._tail: deque[str] = deque(maxlen=20)
        self._pumps = [threading.Thread(target=fn, name=f"job-{name}-{job_id}", daemon=True)
                       for name, fn in (("out", self._pump_stdout), ("err", self._pump_stderr))]
        for t in self._pumps:
            t.start()

    @classmethod
    def spawn(cls, job_id: str, argv: list[str], env: dict[str, str], cwd: Path,
              cores: list[int], fraction: float,
              on_message: Callable[[str, dict], None]) -> JobProcess:
        with _spawn_lock:
            before = os.sched_getaffinity(0)
            if cores:
                os.sched_setaffinity(0, cores)  # this thread only; the child inherits it
            try:
                popen = subprocess.Popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True, close_fds=True)
            finally:
                if cores:
                    os.sched_setaffinity(0, before)
        try:
            if cores and os.sched_getaffinity(popen.pid) != set(cores):  # belt and braces
                os.sched_setaffinity(popen.pid, cores)
        except ProcessLookupError:
            pass  # already gone: its exit code will say why
        logger.info("training job %s started: pid %d, cores %s, fraction %.2f",
                    job_id, popen.pid, cores or "-", fraction)
        return cls(job_id, popen, cores, fraction, on_message)

    def _pump_stdout(self) -> None:
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if not isinstance(msg, dict) or "event" not in msg:
                logger.info("[job %s] %s", self.job_id, line[:500])
                continue
            if msg["event"] == "done":
                self.done_reported = True
            try:
                self.on_message(self.job_id, msg)
            except Exception:  # a bad callback must not stop the pump
                logger.exception("job %s: progress callback failed", self.job_id)
        self.popen.stdout.close()

    def _pump_stderr(self) -> None:
        for raw in self.popen.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                logger.info("[job %s stderr] %s", self.job_id, line[:500])
        self.popen.stderr.close()

    def tail(self) -> str:
        return "\n".join(self._tail)

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is not None:
            for t in self._pumps:  # read what it printed before it went
                t.join(2.0)
        return rc

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self, reason: str, grace: float) -> None:
        """Ask it to checkpoint and exit (SIGTERM to its group); once only."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_deadline = time.monotonic() + grace
            logger.info("training job %s: SIGTERM (%s), grace %.0fs", self.job_id, reason, grace)
            self._signal(signal.SIGTERM)

    def kill_if_overdue(self) -> bool:
        """SIGKILL the group once the grace period is over; True if it did."""
        if self.killed or self.stop_deadline is None or time.monotonic() < self.stop_deadline:
            return False
        logger.warning("training job %s (pid %d) ignored SIGTERM; killing it",
                       self.job_id, self.pid)
        self.killed = True
        self._signal(signal.SIGKILL)
        return True


def kill_orphan(pid: int, job_id: str, grace: float) -> bool:
    """Stop a job process left by a previous agent run, if ``pid`` is still that job
    (its environment names the job: a recycled pid is left alone). True if found."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    if f"AIDC_JOB_ID={job_id}".encode() not in environ:
        return False
    logger.warning("training job %s: stopping process %d left by a previous run", job_id, pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return True
            time.sleep(0.05)
    return True


def _zombie(pid: int) -> bool:
    try:
        return ") Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
