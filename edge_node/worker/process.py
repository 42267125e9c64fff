"""The model worker process: one app dir, one ONNX Runtime session, one Unix socket.

``python -m edge_node.worker --app-dir DIR --socket PATH [--threads N] [--cpus 0,1]
[--inter-threads N] [--spin 0|1] [--provider cpu|cuda --device-id N --gpu-mem-mb M]``

The flags after ``--socket`` are a slice's settings
(:class:`~edge_node.resources.slices.WorkerSettings`, which builds them): the
worker pins itself to ``--cpus`` before ONNX Runtime starts its threads, and
reports what is really in effect under ``runtime`` in its READY line and its
``meta`` reply. A provider it cannot use exits 2 with the reason.

Loads and checks the app (exit 2 with a ``CRITICAL`` line on stderr when the
model does not match its manifest or cannot be loaded), runs one self-check
request, then listens on its Unix socket (:mod:`edge_node.worker.endpoint`:
wire frames, no pickle) and prints ``READY <json meta>`` as its only stdout line. Every connection gets its
own thread; ONNX Runtime releases the GIL, so requests run concurrently.
``AIDC_WORKER_AUTHKEY`` (hex) turns on the HMAC handshake; the socket is 0600
either way. ``AIDC_ORT_SPIN=1`` lets ONNX Runtime's threads busy-wait when
``--spin`` is not given (off by default: an idle spinning pool steals cores
from its neighbours).
SIGTERM: stop accepting, let in-flight requests finish (up to 3 s),
exit 0. Started by the supervisor (``AIDC_WORKER_PARENT_PID`` set), it also
asks Linux for SIGTERM when its parent dies.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from cloud_sync.errors import PackageError

from ..resources.slices import WorkerSettings, add_arguments, from_args
from .endpoint import UnixListener, serve_connection
from .errors import ModelMismatch
from .handler import Handler
from .loader import UnusableSettings, load_app

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class _Stop(BaseException):
    """Raised in the main thread by the SIGTERM handler."""


def _on_signal(signum, frame) -> None:
    raise _Stop()


def _die_with_parent() -> None:
    parent = os.environ.get("AIDC_WORKER_PARENT_PID")
    if not parent:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        raise _Stop()


def serve(handler: Handler, path: Path, authkey: bytes | None, meta: dict) -> None:
    listener = UnixListener(path)
    print("READY " + json.dumps(meta), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout is done; keep the pipe quiet
    logger.info("serving %s %s on %s (pid %d)", meta["name"], meta["version"], path, os.getpid())
    try:
        while True:
            conn = listener.accept()
            threading.Thread(target=serve_connection, args=(conn, handler, authkey),
                             name="conn", daemon=True).start()
    except _Stop:
        pass
    finally:
        listener.close()
    deadline = time.monotonic() + 3.0
    while handler.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.info("stopped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edge_node.worker",
                                description=__doc__.split("\n")[0])
    p.add_argument("--app-dir", required=True, type=Path)
    p.add_argument("--socket", required=True, type=Path)
    add_arguments(p)
    return p.parse_args(argv)


def _pin(settings: WorkerSettings) -> None:
    """Pin every thread (numpy's and OpenCV's pools started at import) to the slice's
    cores, before ONNX Runtime starts its own, which inherit the main thread's mask."""
    if not settings.cpus:
        return
    try:
        os.sched_setaffinity(0, set(settings.cpus))
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), set(settings.cpus))
            except ProcessLookupError:  # a thread that just ended
                pass
    except OSError as err:
        raise UnusableSettings(
            f"cannot pin to CPUs {list(settings.cpus)}: {err.strerror}; "
            f"this process may use {sorted(os.sched_getaffinity(0))}") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    # A terminal's Ctrl-C reaches the whole process group; the agent stops its
    # workers itself, in order, so a worker ignores SIGINT (SIGTERM stops it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _die_with_parent()
        settings = from_args(args)
        _pin(settings)
        key = os.environ.get("AIDC_WORKER_AUTHKEY")
        authkey = bytes.fromhex(key) if key else None
        app = load_app(args.app_dir, settings=settings)
        handler = Handler(app)
        handler.self_check()
        meta = {**app.meta(), "pid": os.getpid(), "threads": settings.threads,
                "socket": str(args.socket)}
        serve(handler, args.socket, authkey, meta)
    except _Stop:
        logger.info("stopped before serving")
    except (ModelMismatch, PackageError, UnusableSettings) as err:
        logger.critical("%s", err)
        return 2
    except Exception as err:
        logger.critical("cannot serve %s: %s: %s", args.app_dir, type(err).__name__, err)
        return 2
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)  # daemon connection threads may sit inside ORT; skip interpreter teardown
