"""Talk to a model worker over its Unix socket; safe to share between threads.

Each concurrent caller borrows its own connection from a small pool and gives
it back afterwards, so N threads use N connections and the worker serves them
in parallel. A pooled connection found dead (the worker restarted) is replaced
once, transparently; requests are idempotent, so the retry is safe.
"""

from __future__ import annotations

import logging
import pickle
import select
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path

import numpy as np

from .errors import WorkerError, WorkerUnavailable

logger = logging.getLogger(__name__)
#: requests and replies are pickled with this protocol (5: numpy buffers in-band, fast)
PROTOCOL = 5


class _Stale(Exception):
    """The connection broke; a pooled one is retried once on a fresh connection."""


class WorkerClient:
    def __init__(self, socket_path: str | Path, authkey: bytes | None = None, *,
                 timeout: float = 30.0, max_idle: int = 16) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._authkey = authkey
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WorkerClient({self.socket_path!r})"

    def _connect(self) -> Connection:
        try:
            return Client(self.socket_path, family="AF_UNIX", authkey=self._authkey)
        except AuthenticationError as err:
            raise WorkerUnavailable(
                f"worker at {self.socket_path}: authentication failed") from err
        except (OSError, EOFError) as err:
            raise WorkerUnavailable(
                f"worker at {self.socket_path} is not reachable: {err}") from err

    def _acquire(self) -> tuple[Connection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _release(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, msg: dict) -> dict:
        """Send one request dict; return the ok reply or raise WorkerError/WorkerUnavailable."""
        for attempt in (0, 1):
            conn, pooled = self._acquire()
            try:
                reply = self._roundtrip(conn, msg)
            except _Stale as err:
                if pooled and attempt == 0:
                    logger.debug("stale pooled connection to %s: %s",
                                 self.socket_path, err.__cause__)
                    continue
                raise WorkerUnavailable(
                    f"worker at {self.socket_path} went away: {err.__cause__}") from err
            self._release(conn)
            if not reply.get("ok"):
                raise WorkerError(int(reply.get("status", 500)), str(reply.get("error", "unknown")))
            return reply
        raise AssertionError("unreachable")

    def _roundtrip(self, conn: Connection, msg: dict) -> dict:
        try:
            conn.send_bytes(pickle.dumps(msg, protocol=PROTOCOL))
        except (EOFError, OSError) as err:
            conn.close()
            raise _Stale() from err
        except BaseException:
            self._release(conn)  # pickling failed before anything was written
            raise
        try:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            if not poller.poll(self.timeout * 1000):
                raise WorkerUnavailable(
                    f"worker at {self.socket_path} did not answer within {self.timeout:g}s")
            reply = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as err:
            conn.close()
            raise _Stale() from err
        except Exception as err:
            conn.close()
            if isinstance(err, WorkerUnavailable):
                raise
            raise WorkerUnavailable(f"unexpected reply from the worker at {self.socket_path} "
                                    f"({err}); wrong or missing authkey?") from err
        except BaseException:
            conn.close()
            raise
        if not isinstance(reply, dict):
            conn.close()
            raise WorkerUnavailable(f"unexpected reply from the worker at {self.socket_path}")
        return reply

    def ping(self) -> dict:
        return self.request({"op": "ping"})

    def meta(self) -> dict:
        """``{"name", "version", "task", "inputs", "outputs", "classify"}`` (v2 datatypes)."""
        return self.request({"op": "meta"})["meta"]

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
              ) -> dict[str, np.ndarray]:
        return self.request({"op": "infer", "inputs": inputs, "outputs": outputs})["outputs"]

    def classify(self, image: bytes) -> tuple[dict, np.ndarray]:
        """The classify dict and the input tensor the image became."""
        reply = self.request({"op": "classify", "image": bytes(image)})
        return reply["result"], reply["input"]

    def close(self) -> None:
        """Close the idle connections (the client stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
