"""Real MQTT brokers for tests: Mosquitto on 127.0.0.1 at a free port.

``scripts/test.sh`` (the README's test command, which CI runs) installs
Mosquitto when it is missing. Without it the broker fixtures fail with a clear
message. ``AIDC_TEST_BROKER=embedded`` runs them against the demo's embedded
broker instead (amqtt: no shared subscriptions, and weaker session handling,
so some tests fail there) -- for poking at the demo broker, never in CI.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"broker did not listen on {port} within {timeout}s")


class Broker:
    """A broker process that can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None,
                 auth: tuple[Path, Path] | None = None) -> None:
        """``auth``: (password_file, acl_file) -- no anonymous clients then."""
        self.host = "127.0.0.1"
        self.auth = auth
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.kind = os.environ.get("AIDC_TEST_BROKER", "mosquitto")
        if self.kind == "mosquitto" and not shutil.which("mosquitto"):
            raise RuntimeError("the MQTT tests need Mosquitto: apt-get install -y mosquitto "
                               "(scripts/test.sh installs it)")
        if self.kind != "mosquitto" and os.environ.get("CI") == "true":
            raise RuntimeError("CI must test against a real Mosquitto")

    def start(self) -> "Broker":
        log = open(self.workdir / f"broker-{self.port}.log", "ab")
        if self.kind == "mosquitto":
            conf = self.workdir / f"mosquitto-{self.port}.conf"
            access = "allow_anonymous true\n"
            if self.auth:
                # as root Mosquitto would drop to user mosquitto, who cannot
                # read the test's files: stay who we are
                me = pwd.getpwuid(os.getuid()).pw_name
                access = (f"allow_anonymous false\npassword_file {self.auth[0]}\n"
                          f"acl_file {self.auth[1]}\nuser {me}\n")
            conf.write_text(
                f"listener {self.port} 127.0.0.1\n{access}"
                "persistence false\nmax_queued_messages 100000\n"
            )
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "installer.embedded_broker", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


def make_broker() -> Broker:
    return Broker(Path(tempfile.mkdtemp(prefix="aidc-broker-"))).start()
