"""Publishes the node's reported state (retained), debounced.

Anything that changes what the node runs calls :meth:`Reporter.changed`; at
most one retained ``state/reported`` message goes out per ``min_interval``,
and one on every reconnect (the broker may have lost its retained messages).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloud_sync import schemas
from cloud_sync.connection import MqttConnection

logger = logging.getLogger(__name__)


class Reporter:
    def __init__(self, conn: MqttConnection, topic: str,
                 build: Callable[[], schemas.ReportedState], min_interval: float = 0.5) -> None:
        self.conn = conn
        self.topic = topic
        self.build = build
        self.min_interval = min_interval
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0

    def changed(self) -> None:
        self._dirty.set()

    def start(self) -> None:
        self.conn.on_connect(self.changed)
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                state = self.build()
                if self.conn.publish(self.topic, state.to_bytes(), qos=1, retain=True):
                    self.published += 1
                else:
                    pass  # offline: the on_connect hook marks us dirty again
            except Exception:  # noqa: BLE001
                logger.exception("could not build or publish the reported state")
            self._stop.wait(self.min_interval)
