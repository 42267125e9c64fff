"""Entry point of a stream's capture process (started with the ``spawn`` method).

Names itself ``aidc-cam:<id>`` (what ``ps -o comm`` shows), ignores SIGINT (the
agent stops its children in order), turns SIGTERM into a clean stop, asks Linux
for SIGTERM when the agent dies, then runs :class:`~.capture.CaptureLoop`.
Exit status 0 means stopped or the file ended; the ring is unlinked on the way out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
#: FFmpeg's own log level (AV_LOG_QUIET; OpenCV would print it to stdout): failures
#: are counted and explained in the stream's status instead
FFMPEG_LOGLEVEL = "-8"


def _linux_prctl(option: int, value) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _setup(stream_id: str, parent_pid: int, log_level: int) -> None:
    _linux_prctl(PR_SET_NAME, f"aidc-cam:{stream_id}"[:15].encode())
    _linux_prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the agent died before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", FFMPEG_LOGLEVEL)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s cam:{stream_id} %(levelname)s %(name)s: %(message)s")


def main(cfg, frames, events, cells, stop, ring_prefix: str, parent_pid: int,
         log_level: int = logging.WARNING) -> None:
    """Process target: capture ``cfg`` (a StreamConfig) until stopped or ended."""
    _setup(cfg.id, parent_pid, log_level)
    import cv2

    from .capture import CaptureLoop
    from .counters import Counters

    if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    loop = CaptureLoop(cfg, frames, events, Counters(cells), stop, ring_prefix)

    def _term(signum, frame) -> None:
        loop.terminated = True

    signal.signal(signal.SIGTERM, _term)
    try:
        loop.run()
    except Exception:
        logging.getLogger(__name__).exception("stream %s: capture loop failed", cfg.id)
        loop.status("offline", "capture process crashed (see the node log)")
        raise SystemExit(3) from None
    finally:
        loop.close()
