"""Helpers for the camera-stream tests: real video files, a real MJPEG server, process
and shared-memory inspection. Everything binds to 127.0.0.1 and writes under tmp dirs."""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import threading
import time
from pathlib import Path

import cv2
import numpy as np

#: a frame's index is its grey level / LEVEL_STEP (JPEG keeps flat images within +-1)
LEVEL_STEP = 5


def wait_for(pred, timeout: float = 20.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def index_frame(i: int, shape=(48, 64)) -> np.ndarray:
    """A flat BGR frame whose grey level says its index ``i`` (0..50)."""
    return np.full((*shape, 3), (i * LEVEL_STEP) % 256, np.uint8)


def frame_index(frame: np.ndarray) -> int:
    return int(round(float(frame.mean()) / LEVEL_STEP))


def digit_frame(sample, size: int | tuple[int, int] = 32) -> np.ndarray:
    """One 8x8 digit (0..16) as a BGR frame of ``size`` (square, or ``(h, w)``), filling it
    as a camera close up would see it; an area resize to 8x8 gives the digit back."""
    h, w = (size, size) if isinstance(size, int) else size
    img = np.round(np.asarray(sample, np.float32).reshape(8, 8) * (255 / 16)).astype(np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """An MJPG .avi of ``frames`` at ``fps``."""
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened(), "OpenCV cannot write MJPG"
    for f in frames:
        vw.write(f)
    vw.release()
    return Path(path)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MjpegServer:
    """``multipart/x-mixed-replace`` MJPEG on 127.0.0.1, numbered frames at ``fps``.

    ``mode`` changes what new parts are: ``"ok"``, ``"pause"`` (send nothing,
    keep the connection), ``"close"`` (drop every connection), ``"garbage"``
    (random bytes where the JPEG should be). ``frames_sent`` counts good parts.
    """

    def __init__(self, fps: float = 20.0, shape=(48, 64)) -> None:
        self.fps, self.shape = fps, shape
        self.mode = "ok"
        self.frames_sent = 0
        self.connections = 0
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.connections += 1
                if server.mode == "close":
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                server._serve(self.wfile)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._srv = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}/cam.mjpg"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    def _serve(self, out) -> None:
        rng = np.random.default_rng(0)
        i = 0
        for _ in range(100_000):  # bounded: ~80 min at 20 fps
            if self._stop.is_set() or self.mode == "close":
                return
            if self.mode == "pause":
                time.sleep(0.05)
                continue
            if self.mode == "garbage":
                data = rng.integers(0, 256, 2000, np.uint8).tobytes()
            else:
                data = cv2.imencode(".jpg", index_frame(i % 50, self.shape))[1].tobytes()
            part = (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % len(data) + data + b"\r\n")
            try:
                out.write(part)
                out.flush()
            except OSError:
                return
            if self.mode == "ok":
                self.frames_sent += 1
            i += 1
            time.sleep(1.0 / self.fps)

    def __enter__(self) -> MjpegServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._srv.shutdown()
        self._srv.server_close()


def shm_segments(token: str) -> list[str]:
    """Shared-memory segments in /dev/shm whose name carries a manager's ``token``."""
    return sorted(n for n in os.listdir("/dev/shm") if token in n)


def live_children(pid: int | None = None) -> dict[int, str]:
    """Direct, non-zombie children of ``pid`` (default: this process): pid -> comm."""
    pid = pid or os.getpid()
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry.name)] = comm
    return out
