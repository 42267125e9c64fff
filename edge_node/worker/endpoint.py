"""The worker's side of its Unix socket: listen, authenticate, answer frames.

:class:`UnixListener` makes the 0600 socket; :func:`serve_connection` runs one
connection (in its own thread): the handshake, then request frame -> the
handler (:class:`~edge_node.worker.handler.Handler`, which never raises) ->
reply frame, until the peer hangs up. Frames are :mod:`~edge_node.worker.wire`
frames: tensors arrive as views of the receive buffer and leave as the
session's own output buffers, with no pickling and no copies.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from . import wire

logger = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 10.0


class UnixListener:
    """A listening AF_UNIX socket at ``path``, mode 0600; :meth:`close` removes the file."""

    def __init__(self, path: Path, backlog: int = 128) -> None:
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.listen(backlog)

    def accept(self) -> socket.socket:
        return self.sock.accept()[0]

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def reply_frame(handler, frame) -> list:
    """Decode one request frame, let the handler answer it, encode the reply."""
    try:
        msg = wire.decode(frame)
    except wire.FrameError as err:  # framing is intact; say so and go on
        reply = {"ok": False, "status": 400, "error": f"undecodable request: {err}"}
    else:
        reply = handler.handle(msg)
    try:
        return wire.encode(reply)
    except Exception as err:
        return wire.encode({"ok": False, "status": 500, "error": f"unsendable reply: {err}"})


def serve_connection(sock: socket.socket, handler, authkey: bytes | None) -> None:
    """Serve one client connection until it closes (run in a thread per connection)."""
    try:
        wire.tune(sock)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        wire.server_handshake(sock, authkey)
        sock.settimeout(None)
        while True:
            frame = wire.read_frame(sock)
            if frame is None:
                return
            wire.send(sock, reply_frame(handler, frame))
    except (OSError, EOFError, wire.FrameError, PermissionError) as err:
        logger.debug("connection closed: %s", err)
    finally:
        sock.close()
