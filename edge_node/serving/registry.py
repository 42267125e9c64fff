"""The apps the HTTP API serves, and the hook that sees their results."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cloud_sync.manifest import Manifest
from edge_node.worker.client import WorkerClient

from .batching import BatchPolicy

logger = logging.getLogger(__name__)


@dataclass
class ServedApp:
    """One app as served: identity, manifest, the client of its worker, readiness."""

    name: str
    version: str
    sha256: str
    manifest: Manifest
    client: WorkerClient
    labels: list[str] | None = None
    ready: bool = True
    #: dynamic batching (edge_node/serving/batching.py); None: every request alone
    batch: BatchPolicy | None = None


ResultCallback = Callable[[ServedApp, dict, "np.ndarray | None", "bytes | None", str], None]


class AppRegistry:
    """A thread-safe name -> :class:`ServedApp` map for :func:`make_v2_blueprint`.

    ``loaded`` says the server has finished (re)loading its apps; while False,
    ``/v2/health/ready`` answers 503. ``result_callback`` (settable at any time)
    receives every classification result, see :meth:`on_result`.
    """

    def __init__(self, result_callback: ResultCallback | None = None, loaded: bool = True) -> None:
        self._apps: dict[str, ServedApp] = {}
        self._lock = threading.Lock()
        self.result_callback = result_callback
        self.loaded = loaded

    def add(self, app: ServedApp) -> ServedApp | None:
        """Serve ``app`` under its name; returns the app it replaced, if any."""
        with self._lock:
            old = self._apps.get(app.name)
            self._apps[app.name] = app
        return old

    def remove(self, name: str) -> ServedApp | None:
        with self._lock:
            return self._apps.pop(name, None)

    def get(self, name: str) -> ServedApp | None:
        with self._lock:
            return self._apps.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._apps)

    def on_result(self, app: ServedApp, result: dict, input_tensor: np.ndarray | None,
                  image: bytes | None, source: str) -> None:
        """Called by the API after each successful classification-style result.

        ``source`` is ``"v2-infer"`` or ``"v2-classify"``; ``image`` is the
        uploaded bytes when there were any; ``input_tensor`` is what the model
        was fed (batch of 1).
        """
        cb = self.result_callback
        if cb is not None:
            cb(app, result, input_tensor, image, source)
