"""Where frames come from: parse a stream URL, open it with OpenCV, explain failures.

Accepted: ``rtsp://`` / ``rtsps://`` (over TCP), ``http://`` / ``https://``
(MJPEG ``multipart/x-mixed-replace`` or a video file), ``file:///path`` or a
plain path, and ``usb:N`` (``/dev/videoN`` through V4L2). Network and file
sources open through the FFMPEG backend with open and read timeouts, so a dead
camera never hangs the capture loop for longer than those.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

NETWORK_SCHEMES = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}


@dataclass(frozen=True)
class Source:
    kind: str  #: "network", "file" or "usb"
    target: str | int  #: what OpenCV opens: a URL, a path or a device index
    url: str  #: as configured

    @property
    def live(self) -> bool:
        """A camera paces itself; a file is paced by the capture loop at its own fps."""
        return self.kind != "file"


def parse_source(url: str) -> Source:
    """The source ``url`` names; ValueError saying what is wrong otherwise."""
    url = (url or "").strip()
    if not url:
        raise ValueError("the stream url is empty")
    if url.startswith("usb:"):
        index = url[4:]
        if not index.isdigit():
            raise ValueError(f"usb source {url!r}: expected usb:N with N a device number")
        return Source("usb", int(index), url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in NETWORK_SCHEMES:
        if not parts.hostname:
            raise ValueError(f"{scheme} source {redact(url)!r} has no host")
        return Source("network", url, url)
    if scheme == "file":
        if not parts.path:
            raise ValueError(f"file source {url!r} has no path")
        return Source("file", parts.path, url)
    if scheme and len(scheme) > 1:  # "C:" style drive letters are not a scheme here
        raise ValueError(f"unsupported source scheme {scheme!r} in {redact(url)!r}: "
                         "use rtsp://, http(s)://, file://, a path or usb:N")
    return Source("file", url, url)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and status)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def open_capture(src: Source, open_timeout: float, read_timeout: float):
    """An opened ``cv2.VideoCapture``, or None when the source cannot be opened."""
    import cv2

    if src.kind == "usb":
        cap = cv2.VideoCapture(int(src.target), cv2.CAP_V4L2)
    else:
        if src.kind == "network" and str(src.target).lower().startswith("rtsp"):
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]
        cap = cv2.VideoCapture(str(src.target), cv2.CAP_FFMPEG, params)
    if cap.isOpened():
        return cap
    cap.release()
    return None


def explain_open_failure(src: Source, timeout: float = 2.0) -> str:
    """A human reason why ``src`` did not open (probes a network host with TCP)."""
    shown = redact(src.url)
    if src.kind == "usb":
        dev = Path(f"/dev/video{src.target}")
        if not dev.exists():
            return f"cannot open {shown}: no video device {dev}"
        return f"cannot open {shown}: {dev} exists but is busy or not a capture device"
    if src.kind == "file":
        path = Path(str(src.target))
        if not path.exists():
            return f"cannot open {shown}: file not found"
        if not os.access(path, os.R_OK):
            return f"cannot open {shown}: file not readable (permissions)"
        return f"cannot open {shown}: not a video OpenCV can decode"
    parts = urlsplit(str(src.target))
    port = parts.port or NETWORK_SCHEMES[parts.scheme.lower()]
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except socket.gaierror as err:
        return f"cannot open {shown}: host {parts.hostname!r} not resolvable ({err})"
    except ConnectionRefusedError:
        return f"cannot open {shown}: connection refused by {parts.hostname}:{port}"
    except TimeoutError:
        return f"cannot open {shown}: no answer from {parts.hostname}:{port} within {timeout:g}s"
    except OSError as err:
        return f"cannot open {shown}: {parts.hostname}:{port} unreachable ({err})"
    return (f"cannot open {shown}: {parts.hostname}:{port} accepts connections but "
            "sends no video OpenCV can decode (wrong path, credentials or format?)")
