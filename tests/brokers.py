"""Real MQTT brokers for tests: Mosquitto on 127.0.0.1 at a free port.

``scripts/test.sh`` (the README's test command, which CI runs) installs
Mosquitto when it is missing. Without it the broker fixtures fail with a clear
message. ``AIDC_TEST_BROKER=embedded`` runs them against the demo's embedded
broker instead (amqtt: no shared subscriptions, and weaker session handling,
so some tests fail there) -- for poking at the demo broker, never in CI.

``Broker(..., tls=tls_certs(dir))`` makes the port a TLS-only listener with a
private CA made by :mod:`appstore.broker_tls` (tests/test_broker_tls.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appstore.broker_tls import BrokerCerts, ensure_broker_certs
from cloud_sync.connection import Tls
from installer.ports import free_port, wait_port  # noqa: F401 - free_port: used by tests


class Broker:
    """A broker process that can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None,
                 auth: tuple[Path, Path] | None = None, tls: BrokerCerts | None = None,
                 require_certificate: bool = False) -> None:
        """``auth``: (password_file, acl_file) -- no anonymous clients then.
        ``tls``: the port is a TLS listener (and the only one) serving these
        certificates (:func:`tls_certs`); clients connect with :meth:`client_tls`.
        ``require_certificate``: clients must show a certificate of the same CA."""
        self.host = "127.0.0.1"
        self.auth = auth
        self.tls = tls
        self.require_certificate = require_certificate
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
            # as root Mosquitto would drop to user mosquitto, who cannot read
            # the test's files: stay who we are
            me = f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            if self.auth:
                access = (f"allow_anonymous false\npassword_file {self.auth[0]}\n"
                          f"acl_file {self.auth[1]}\n{me}")
            listener = f"listener {self.port} 127.0.0.1\n"
            if self.tls:
                listener += (f"cafile {self.tls.ca_cert}\ncertfile {self.tls.server_cert}\n"
                             f"keyfile {self.tls.server_key}\ntls_version tlsv1.2\n")
                if self.require_certificate:
                    listener += "require_certificate true\n"
                access += me if not self.auth else ""
            conf.write_text(
                f"{listener}{access}"
                "persistence false\nmax_queued_messages 100000\n"
            )
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            if self.tls:
                raise RuntimeError("the embedded broker has no TLS: test TLS on Mosquitto")
            cmd = [sys.executable, "-m", "installer.embedded_broker", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def client_tls(self) -> Tls:
        """What a client that trusts this broker's CA connects with."""
        assert self.tls is not None, "not a TLS broker"
        return Tls(ca_file=self.tls.ca_cert)

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


def tls_certs(workdir: Path, names: tuple[str, ...] = ("127.0.0.1",)) -> BrokerCerts:
    """A private CA and a server certificate for ``names`` in ``workdir/tls``,
    made by the AppStore's own ``aidc store broker-certs`` code."""
    return ensure_broker_certs(workdir / "tls", list(names))


def make_broker() -> Broker:
    return Broker(Path(tempfile.mkdtemp(prefix="aidc-broker-"))).start()
