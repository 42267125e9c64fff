"""MQTT connection manager on paho-mqtt (v2 callback API).

- connects in its own thread and reconnects for ever with exponential backoff
  *with full jitter*, so a fleet that lost its broker does not come back in
  lockstep;
- subscriptions are registered once and (re)made in ``on_connect``, so every
  reconnect resubscribes;
- ``connected`` is set only on a *successful* CONNACK, never after a refused one,
  and only once the broker has acknowledged every subscription (SUBACK), so a
  caller that waits for it never publishes into a reply it cannot yet hear;
- a retained "online" availability message is published on every connect and a
  retained "offline" one is left with the broker as the last will;
- handlers run on the network thread: they must be quick (hand heavy work to a
  thread of their own). An exception in a handler is logged and counted, and the
  connection carries on.

- TLS (:class:`Tls`): the broker's certificate is checked against a CA file (or
  the system's trust store), with hostname verification, TLS 1.2 or later; a
  client certificate and key can be given for mutual TLS. A CA, certificate or
  key that cannot be read is a :class:`TlsError` when the connection is made,
  not a hang; a handshake the broker's certificate fails is logged as an error
  that says so (``last_error``, ``stats["tls_failed"]``) and retried with the
  same backoff.

- a half-open connection (the broker or a NAT box went away without a FIN or
  RST: the socket looks open, nothing arrives) is found by an application-level
  ping: with ``ping_topic`` set, a small QoS 1 message goes out every
  ``ping_interval`` seconds and the broker's PUBACK must come back within
  ``ping_timeout``; else the connection is dropped (``stats["half_open"]``,
  ``last_error``) and made again with the usual backoff. MQTT's own keepalive
  only finds it after 1.5-2 x ``keepalive``; the ping bounds detection to
  ``ping_interval + ping_timeout`` (20 s by default). Nobody subscribes to the
  ping topic: the PUBACK is the answer.

paho keeps its own queue in memory only: durability is the outbox's job
(:mod:`cloud_sync.outbox`), not this module's.
"""

from __future__ import annotations

import logging
import json
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

logger = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]  # topic, payload, retained


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class TlsError(ValueError):
    """A TLS setting that cannot work: a CA, certificate or key that cannot be read."""


@dataclass(frozen=True)
class Tls:
    """TLS to the broker. ``ca_file`` None: the system's trust store (a broker
    with a public certificate). ``cert_file``/``key_file``: this client's own
    certificate, for brokers that ask for one (``require_certificate true``).
    ``check_hostname``: the broker's certificate must name the host connected
    to (leave it on)."""

    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context: TLS >= 1.2, certificate required. Raises
        :class:`TlsError` naming the file that cannot be used."""
        if self.ca_file is not None:
            _readable("CA file", self.ca_file)
        if self.key_file is not None and self.cert_file is None:
            raise TlsError("a client key needs its certificate too (cert_file)")
        if self.cert_file is not None:
            _readable("client certificate", self.cert_file)
            if self.key_file is not None:
                _readable("client key", self.key_file)
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file is not None else None)
        except (ssl.SSLError, OSError) as err:
            raise TlsError(f"CA file {self.ca_file}: not a PEM certificate ({err})") from err
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(str(self.cert_file),
                                    str(self.key_file) if self.key_file is not None else None)
            except (ssl.SSLError, OSError) as err:
                raise TlsError(f"client certificate {self.cert_file} / key "
                               f"{self.key_file or '(in the same file)'}: cannot be used "
                               f"({err})") from err
        return ctx


def _readable(what: str, path: Path | str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise TlsError(f"{what} {path}: cannot be read ({err.strerror or err})") from err


def describe_tls_error(err: BaseException) -> str:
    """What a failed TLS handshake means, for a person reading the log."""
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or str(err)
        if "mismatch" in why.lower() or "hostname" in why.lower():
            hint = ("the broker's certificate does not name this host: connect by a "
                    "name or IP in its subjectAltName, or renew it with that name")
        else:
            hint = ("the broker's certificate is not signed by the CA this client trusts "
                    "(mqtt ca_file), or it has expired")
        return f"certificate verify failed: {why}: {hint}"
    return f"TLS handshake failed: {err} (is this port a TLS listener?)"


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


def _strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class MqttConnection:
    """One MQTT client with its own network thread."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        will: Will | None = None,
        online: Will | None = None,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
        seed: int | None = None,
        tls: Tls | None = None,
        ping_topic: str | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
    ) -> None:
        """``tls``: connect with TLS (:class:`Tls`); its files are read now, and a
        :class:`TlsError` says which one cannot be used. ``ping_topic``: find a
        half-open connection by a QoS 1 ping every ``ping_interval`` s whose
        PUBACK must arrive within ``ping_timeout`` s (None: MQTT keepalive only)."""
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self._online = online
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._rng = random.Random(seed)
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.stats: Counter[str] = Counter()
        self.tls = tls
        #: why the last connection attempt failed (None after a success)
        self.last_error: str | None = None
        self.ping_topic, self.ping_interval, self.ping_timeout = \
            ping_topic, ping_interval, ping_timeout
        self._ping_mid: int | None = None  # the ping waiting for its PUBACK
        self._ping_sent = 0.0  # monotonic, when it (or the last one) went out
        #: round trip of the last answered ping, ms
        self.ping_rtt_ms: float | None = None

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if username:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls.context())
        if will:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(10000)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        self._pending_subacks: set[int] = set()
        self._connack = False
        self._client = c

    # -- public API ---------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Register ``handler`` for ``topic_filter``; made now if connected and
        again on every reconnect."""
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the network thread) after every successful connect."""
        self._on_connect_hooks.append(hook)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to paho. Returns False when not connected (nothing is
        queued then: callers that must not lose it keep it in their outbox)."""
        if not self.connected.is_set():
            self.stats["publish_offline"] += 1
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.stats["publish_failed"] += 1
            return False
        self.stats["published"] += 1
        return True

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and join the network thread."""
        self._stop.set()
        if self.connected.is_set() and self._online is not None:
            # A clean disconnect suppresses the will: say offline ourselves.
            will_payload = getattr(self, "_offline_payload", None)
            if will_payload is not None:
                info = self._client.publish(self._online.topic, will_payload, qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=1.0)
                except (RuntimeError, ValueError):
                    pass
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        if self._thread:
            self._thread.join(timeout)
        self.connected.clear()

    def set_offline_payload(self, payload: bytes) -> None:
        """What :meth:`stop` publishes on the availability topic on a clean stop."""
        self._offline_payload = payload

    # -- network thread -----------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self._client.connect(self.host, self.port, self.keepalive)
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.CertificateError, mqtt.WebsocketConnectionError) as err:
                self.stats["connect_failed"] += 1
                delay = backoff_delay(attempt, self._min_backoff, self._max_backoff, self._rng)
                if isinstance(err, ssl.SSLError | ssl.CertificateError):
                    # not a network blip: the same error will come back until
                    # someone fixes a certificate, so say it loudly (once a while)
                    self.stats["tls_failed"] += 1
                    self.last_error = describe_tls_error(err)
                    log = logger.error if self.stats["tls_failed"] in (1, 10) or \
                        self.stats["tls_failed"] % 100 == 0 else logger.info
                    log("mqtt %s: TLS to %s:%s: %s; retry in %.2fs", self.client_id,
                        self.host, self.port, self.last_error, delay)
                elif self.tls is not None and isinstance(err, ConnectionResetError):
                    self.stats["tls_failed"] += 1
                    self.last_error = (f"TLS handshake failed: {err} (the broker hung up: is "
                                       "this port a TLS listener?)")
                    logger.log(logging.ERROR if self.stats["tls_failed"] == 1 else logging.INFO,
                               "mqtt %s: TLS to %s:%s: %s; retry in %.2fs", self.client_id,
                               self.host, self.port, self.last_error, delay)
                else:
                    self.last_error = f"connect failed: {err}"
                    logger.info("mqtt %s: connect to %s:%s failed (%s), retry in %.2fs",
                                self.client_id, self.host, self.port, err, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            self._connack = False
            self._ping_mid, self._ping_sent = None, time.monotonic()
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self.connected.is_set():
                    attempt = 0
                    if self.ping_topic and self._ping_due():
                        break  # half-open: drop it, connect again
            self.connected.clear()
            if self._stop.is_set():
                break
            self.stats["connection_lost"] += 1
            if not self._connack:  # hung up on our CONNECT: not an MQTT answer at all
                self.stats["closed_before_connack"] += 1
                self.last_error = ("the broker closed the connection before answering CONNECT"
                                   + (" (is this a TLS port? then set TLS on: mqtt.tls)"
                                      if self.tls is None else
                                      " (does it ask for a client certificate? mqtt.cert_file)"
                                      if self.tls.cert_file is None else ""))
                if self.stats["closed_before_connack"] == 1:
                    logger.warning("mqtt %s: %s:%s: %s", self.client_id, self.host, self.port,
                                   self.last_error)
            delay = backoff_delay(attempt, self._min_backoff, self._max_backoff, self._rng)
            attempt += 1
            logger.info("mqtt %s: connection lost, reconnect in %.2fs", self.client_id, delay)
            self._stop.wait(delay)
        # let a pending clean DISCONNECT go out
        try:
            self._client.loop(timeout=0.2)
        except Exception:  # noqa: BLE001
            pass

    def _ping_due(self) -> bool:
        """Send the next ping when due; True when the last one went unanswered for
        ``ping_timeout`` (the connection is half-open: it has been dropped)."""
        now = time.monotonic()
        if self._ping_mid is not None:
            if now - self._ping_sent < self.ping_timeout:
                return False
            self.stats["half_open"] += 1
            self.last_error = (f"no answer to a ping for {self.ping_timeout:g} s: the "
                               "connection is half-open (dropped, connecting again)")
            logger.warning("mqtt %s: %s:%s: %s", self.client_id, self.host, self.port,
                           self.last_error)
            self._ping_mid = None
            self.connected.clear()
            try:
                sock = self._client.socket()
                if sock is not None:
                    sock.close()  # no DISCONNECT: the broker must still send our will
            except OSError:
                pass
            return True
        if now - self._ping_sent >= self.ping_interval:
            info = self._client.publish(self.ping_topic, json.dumps(
                {"ts": round(time.time(), 3)}).encode(), qos=1)
            self._ping_sent = now
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._ping_mid = info.mid
                self.stats["pings"] += 1
        return False

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if self._ping_mid is not None and mid == self._ping_mid:
            self._ping_mid = None
            self.ping_rtt_ms = round((time.monotonic() - self._ping_sent) * 1000, 1)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = True
        if reason_code.is_failure:
            self.stats["connect_refused"] += 1
            self.last_error = f"broker refused connection: {reason_code}"
            logger.warning("mqtt %s: broker refused connection: %s", self.client_id, reason_code)
            self.connected.clear()
            return
        with self._lock:
            subs = list(self._subs.items())
            self._pending_subacks = set()
            for topic_filter, (qos, _h) in subs:
                rc, mid = client.subscribe(topic_filter, qos=qos)
                if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subacks.add(mid)
            waiting = bool(self._pending_subacks)
        if self._online is not None:
            client.publish(self._online.topic, self._online.payload, qos=self._online.qos,
                           retain=self._online.retain)
        self.stats["connects"] += 1
        self.last_error = None
        logger.info("mqtt %s: connected to %s:%s%s", self.client_id, self.host, self.port,
                    " (TLS)" if self.tls is not None else "")
        if not waiting:
            self._ready()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes or []:
            if getattr(rc, "is_failure", False):
                self.stats["subscribe_refused"] += 1
                logger.warning("mqtt %s: broker refused a subscription: %s", self.client_id, rc)
        with self._lock:
            if mid not in self._pending_subacks:
                return
            self._pending_subacks.discard(mid)
            done = not self._pending_subacks
        if done:
            self._ready()

    def _ready(self) -> None:
        """Connected and every subscription acknowledged: tell the callers."""
        self.connected.set()
        for hook in list(self._on_connect_hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook must not kill the network thread
                self.stats["hook_error"] += 1
                logger.exception("mqtt %s: on-connect hook failed", self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.stats["received"] += 1
        with self._lock:
            subs = list(self._subs.items())
        matched = False
        for topic_filter, (_qos, handler) in subs:
            if mqtt.topic_matches_sub(_strip_share(topic_filter), msg.topic):
                matched = True
                try:
                    handler(msg.topic, msg.payload, bool(msg.retain))
                except Exception:  # noqa: BLE001 - count, log, carry on
                    self.stats["handler_error"] += 1
                    logger.exception("mqtt %s: handler for %s failed", self.client_id, msg.topic)
        if not matched:
            self.stats["unmatched"] += 1
