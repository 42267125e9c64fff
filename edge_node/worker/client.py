"""Talk to a model worker over its Unix socket; safe to share between threads.

Each concurrent caller borrows its own connection from a small pool and gives
it back afterwards, so N threads use N connections and the worker serves them
in parallel. A pooled connection found dead (the worker restarted) is replaced
once, transparently, on a fresh connection, and the other idle ones (from the
same dead process) are dropped with it; requests are idempotent, so the retry
is safe.

Messages travel as :mod:`~edge_node.worker.wire` frames (JSON head, raw tensor
bytes): arrays in replies are views of the receive buffer, not copies. The
event-loop flavour of this client is :class:`edge_node.serving.aworker.AsyncWorker`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np

from . import wire
from .errors import WorkerError, WorkerUnavailable

logger = logging.getLogger(__name__)


class _Stale(Exception):
    """The connection broke; a pooled one is retried once on a fresh connection."""


def check_reply(reply: object, where: str) -> dict:
    """The ok reply dict, or raise :class:`WorkerError` / :class:`WorkerUnavailable`."""
    if not isinstance(reply, dict):
        raise WorkerUnavailable(f"unexpected reply from the worker at {where}")
    if not reply.get("ok"):
        raise WorkerError(int(reply.get("status", 500)), str(reply.get("error", "unknown")))
    return reply


class WorkerClient:
    def __init__(self, socket_path: str | Path, authkey: bytes | None = None, *,
                 timeout: float = 30.0, max_idle: int = 16) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._authkey = authkey
        self._max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WorkerClient({self.socket_path!r})"

    @property
    def authkey(self) -> bytes | None:
        return self._authkey

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        wire.tune(sock)
        try:
            sock.connect(self.socket_path)
            wire.client_handshake(sock, self._authkey)
        except PermissionError as err:
            sock.close()
            raise WorkerUnavailable(
                f"worker at {self.socket_path}: authentication failed ({err})") from err
        except (OSError, EOFError, wire.FrameError) as err:
            sock.close()
            raise WorkerUnavailable(
                f"worker at {self.socket_path} is not reachable: {err}") from err
        return sock

    def _acquire(self, fresh: bool = False) -> tuple[socket.socket, bool]:
        if not fresh:
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        return self._connect(), False

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def request(self, msg: dict) -> dict:
        """Send one request dict; return the ok reply or raise WorkerError/WorkerUnavailable."""
        parts = wire.encode(msg)  # a message that cannot be encoded fails before any I/O
        for attempt in (0, 1):
            sock, pooled = self._acquire(fresh=attempt > 0)
            try:
                frame = self._roundtrip(sock, parts)
            except _Stale as err:
                if pooled and attempt == 0:
                    logger.debug("stale pooled connection to %s: %s",
                                 self.socket_path, err.__cause__)
                    self.close()  # the other idle ones date from the same (dead) process
                    continue
                raise WorkerUnavailable(
                    f"worker at {self.socket_path} went away: {err.__cause__}") from err
            try:
                reply = wire.decode(frame)
            except wire.FrameError as err:
                sock.close()
                raise WorkerUnavailable(
                    f"unexpected reply from the worker at {self.socket_path}: {err}") from err
            self._release(sock)
            return check_reply(reply, self.socket_path)
        raise AssertionError("unreachable")

    def _roundtrip(self, sock: socket.socket, parts: list) -> bytearray:
        try:
            wire.send(sock, parts)
            frame = wire.read_frame(sock)
        except TimeoutError as err:
            sock.close()
            raise WorkerUnavailable(f"worker at {self.socket_path} did not answer within "
                                    f"{self.timeout:g}s") from err
        except (EOFError, OSError, wire.FrameError) as err:
            sock.close()
            raise _Stale() from err
        except BaseException:
            sock.close()
            raise
        if frame is None:
            sock.close()
            raise _Stale() from EOFError("connection closed by the worker")
        return frame

    def ping(self, timeout: float | None = None) -> dict:
        """The worker's ping reply. With ``timeout``: on a connection of its own
        (never a pooled one, which a long request may hold) that must connect,
        authenticate and answer within ``timeout`` seconds in all, else
        :class:`WorkerUnavailable` -- a liveness probe: the worker answers a ping
        on its connection's own thread even while inferences run."""
        if timeout is None:
            return self.request({"op": "ping"})
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            wire.client_handshake(sock, self._authkey)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            wire.send(sock, wire.encode({"op": "ping"}))
            frame = wire.read_frame(sock)
            if frame is None:
                raise EOFError("connection closed by the worker")
            return check_reply(wire.decode(frame), self.socket_path)
        except TimeoutError as err:
            raise WorkerUnavailable(f"worker at {self.socket_path} did not answer a ping "
                                    f"within {timeout:g}s") from err
        except (OSError, EOFError, wire.FrameError, PermissionError) as err:
            raise WorkerUnavailable(f"worker at {self.socket_path} did not answer a ping: "
                                    f"{err}") from err
        finally:
            sock.close()

    def meta(self) -> dict:
        """``{"name", "version", "task", "inputs", "outputs", "classify"}`` (v2 datatypes)."""
        return self.request({"op": "meta"})["meta"]

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
              ) -> dict[str, np.ndarray]:
        return self.request({"op": "infer", "inputs": inputs, "outputs": outputs})["outputs"]

    def classify(self, image: bytes) -> tuple[dict, np.ndarray]:
        """The classify dict and the input tensor the image became."""
        reply = self.request({"op": "classify", "image": image})
        return reply["result"], reply["input"]

    def close(self) -> None:
        """Close the idle connections (the client stays usable)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
