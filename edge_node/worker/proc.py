"""One worker OS process: spawn, wait for READY, forward its stderr, stop it.

:func:`private_rss_mb` reads how much memory a worker holds of its own: its
anonymous resident memory (``RssAnon`` in ``/proc/<pid>/status``: the model's
weights, ONNX Runtime's arenas, tensors). Shared library pages, which the
kernel shares between all workers, are not counted against a slice.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections import deque

from .errors import WorkerStartError

logger = logging.getLogger(__name__)
_LEVELS = {"CRITICAL": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
           "DEBUG": logging.DEBUG}


def describe_exit(rc: int | None, tail: str = "") -> str:
    if rc is None:
        why = "still running"
    elif rc < 0:
        try:
            why = f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            why = f"killed by signal {-rc}"
    else:
        why = f"exited with code {rc}"
    last = [ln for ln in tail.splitlines() if ln.startswith(("CRITICAL", "ERROR"))]
    return f"{why}: {last[-1]}" if last else why


def private_rss_mb(pid: int) -> int | None:
    """The process's anonymous resident memory in MB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        return None
    return None


class WorkerProc:
    """A spawned worker and the thread that logs its stderr (keeping a tail)."""

    def __init__(self, key: str, popen: subprocess.Popen) -> None:
        self.key = key
        self.popen = popen
        self.pid = popen.pid
        self._tail: deque[str] = deque(maxlen=40)
        self._stderr_done = threading.Event()
        self._pidfd: int | None = None  # Linux: a pollable handle on the process
        self._pidfd_lock = threading.Lock()
        threading.Thread(target=self._pump_stderr, name=f"stderr-{key}", daemon=True).start()

    @classmethod
    def spawn(cls, key: str, cmd: list[str], env: dict) -> WorkerProc:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, close_fds=True)
        return cls(key, popen)

    def _pump_stderr(self) -> None:
        for raw in self.popen.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            level = _LEVELS.get(line.split(" ", 1)[0], logging.INFO)
            logger.log(level, "[%s %d] %s", self.key, self.pid, line)
        self.popen.stderr.close()
        self._stderr_done.set()

    def tail(self, n: int = 15) -> str:
        return "\n".join(list(self._tail)[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _fail(self, reason: str) -> WorkerStartError:
        self.stop(2.0)
        self._stderr_done.wait(2.0)
        return WorkerStartError(self.key, describe_exit(self.popen.returncode, self.tail())
                                if reason == "exit" else reason, self.tail())

    def wait_ready(self, timeout: float) -> dict:
        """Block until the ``READY <json>`` line; :class:`WorkerStartError` otherwise."""
        fd = self.popen.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(f"not READY within {timeout:g}s")
                if not select.select([fd], [], [], min(left, 1.0))[0]:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._fail("exit")
                buf += chunk
            line = buf.split(b"\n", 1)[0].decode("utf-8", "replace")
            if not line.startswith("READY "):
                raise self._fail(f"unexpected first line on stdout: {line[:200]!r}")
            try:
                return json.loads(line[6:])
            except ValueError as err:
                raise self._fail(f"bad READY line: {err}") from err
        finally:
            self.popen.stdout.close()

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """The exit code once it has exited, or None if still running after ``timeout``.

        On Linux this sleeps on a pidfd until the process exits or the timeout
        passes (no wake-ups meanwhile); ``Popen.wait(timeout)`` would poll
        ``waitpid`` every 50 ms, which for a handful of idle workers was most of
        the agent's idle CPU (docs/benchmarks.md, footprint).
        """
        if timeout is not None and self.popen.returncode is None and self._wait_pidfd(timeout):
            return None
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._pidfd_lock:
            if self._pidfd is not None and self._pidfd >= 0:
                os.close(self._pidfd)
            self._pidfd = -1
        self._stderr_done.wait(2.0)
        return rc

    def _wait_pidfd(self, timeout: float) -> bool:
        """True when still running after ``timeout`` (waited on a pidfd); False when
        it exited or no pidfd is to be had (the caller then waits as before)."""
        with self._pidfd_lock:
            if self._pidfd is None:
                try:
                    self._pidfd = os.pidfd_open(self.pid)
                except (AttributeError, OSError):  # not Linux >= 5.3, or already reaped
                    self._pidfd = -1
            fd = self._pidfd
        if fd < 0:
            return False
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except (OSError, ValueError):  # closed by another waiter: it has exited
            return False
        return not ready

    def rss_mb(self) -> int | None:
        return private_rss_mb(self.pid)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.terminate()
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL now (also ends a SIGSTOPped process)."""
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass

    def stop(self, timeout: float) -> int:
        """SIGTERM, wait ``timeout``, then SIGKILL; returns the exit code."""
        self.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker %s (pid %d) ignored SIGTERM; killing it", self.key, self.pid)
            self.popen.kill()
            return self.popen.wait()
