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

paho keeps its own queue in memory only: durability is the outbox's job
(:mod:`cloud_sync.outbox`), not this module's.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

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
    ) -> None:
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

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if username:
            c.username_pw_set(username, password)
        if will:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(10000)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._pending_subacks: set[int] = set()
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
            except (OSError, mqtt.WebsocketConnectionError) as err:
                self.stats["connect_failed"] += 1
                delay = backoff_delay(attempt, self._min_backoff, self._max_backoff, self._rng)
                logger.info("mqtt %s: connect to %s:%s failed (%s), retry in %.2fs",
                            self.client_id, self.host, self.port, err, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self.connected.is_set():
                    attempt = 0
            self.connected.clear()
            if self._stop.is_set():
                break
            self.stats["connection_lost"] += 1
            delay = backoff_delay(attempt, self._min_backoff, self._max_backoff, self._rng)
            attempt += 1
            logger.info("mqtt %s: connection lost, reconnect in %.2fs", self.client_id, delay)
            self._stop.wait(delay)
        # let a pending clean DISCONNECT go out
        try:
            self._client.loop(timeout=0.2)
        except Exception:  # noqa: BLE001
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.stats["connect_refused"] += 1
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
        logger.info("mqtt %s: connected to %s:%s", self.client_id, self.host, self.port)
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
