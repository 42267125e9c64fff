"""systemd integration: ``Type=notify`` readiness and the service watchdog.

The agent runs under systemd (``installer/systemd/aidc-edge.service``) as a
``Type=notify`` service with ``WatchdogSec``. It speaks the sd_notify protocol
itself (one datagram per message to ``$NOTIFY_SOCKET``; no libsystemd):

- ``READY=1`` once everything is started (HTTP bound, apps being reconciled),
  so ``systemctl start`` returns when the node really runs and units ordered
  after it start after that;
- ``WATCHDOG=1`` every half ``WatchdogSec`` (``$WATCHDOG_USEC``), **only while
  the agent is alive**: its liveness probe finds every long-lived thread
  running and its HTTP server answering ``/v2/health/live`` in time. A probe
  that fails sends ``STATUS=`` with why and no ping; systemd kills the agent
  (SIGABRT) after ``WatchdogSec`` and ``Restart=always`` starts it again. So a
  deadlocked or SIGSTOPped agent is restarted, not only a dead one;
- ``STATUS=`` lines (``systemctl status`` shows them) and ``STOPPING=1`` at a
  clean stop.

Without ``$NOTIFY_SOCKET`` (not under systemd: tests, ``aidc demo``) every call
is a no-op. Abstract socket addresses (``@...``) are supported.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False when not under systemd
        or the send failed (logged, never raised: systemd is a help, not a need)."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall("\n".join(lines).encode())
            self.sent += 1
            return True
        except OSError as err:
            self.failed += 1
            logger.warning("sd_notify to %s: %s", self.address, err)
            return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half ``WatchdogSec``), or None when systemd
    set no watchdog for this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class Watchdog:
    """Pings systemd every ``interval`` seconds while ``probe()`` finds nothing
    wrong (it returns the problems, an empty list when healthy)."""

    def __init__(self, notifier: Notifier, interval: float,
                 probe: Callable[[], list[str]]) -> None:
        self.notifier, self.interval, self.probe = notifier, interval, probe
        self.pings = 0
        self.missed = 0
        self.last_problems: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def beat(self) -> bool:
        """One probe; ping when healthy. True when pinged."""
        try:
            problems = self.probe()
        except Exception as err:  # noqa: BLE001 - a probe that breaks is a problem, not a crash
            problems = [f"liveness probe failed: {err!r}"]
        if problems:
            self.missed += 1
            if problems != self.last_problems:
                logger.error("watchdog: not pinging systemd: %s", "; ".join(problems))
            self.last_problems = problems
            self.notifier.notify("STATUS=unhealthy: " + "; ".join(problems)[:400])
            return False
        if self.last_problems:
            logger.info("watchdog: healthy again")
            self.notifier.notify("STATUS=running")
        self.last_problems = []
        self.pings += 1
        return self.notifier.notify("WATCHDOG=1")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()
