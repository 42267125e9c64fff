"""A worker's client for the event loop: the same frames as :class:`WorkerClient`, no threads.

The HTTP server keeps one :class:`AsyncWorker` per :class:`WorkerClient` (same
socket path and auth key). Each in-flight request holds one connection of a
small pool, as the blocking client does, so N concurrent callers reach the
worker's N connection threads in parallel. Replies are read straight into one
buffer (``asyncio.BufferedProtocol``) and decoded as views. A pooled connection
that dies (the worker restarted) is retried once on a fresh one; a worker that
is gone or mute answers :class:`WorkerUnavailable` (the caller's 503), never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque

from edge_node.worker import wire
from edge_node.worker.client import WorkerClient, check_reply
from edge_node.worker.errors import WorkerError, WorkerUnavailable

logger = logging.getLogger(__name__)
FIRST = 65536


class _Stale(Exception):
    """The connection broke before the reply; retried once when it came from the pool."""


class _Conn(asyncio.BufferedProtocol):
    def __init__(self, owner: AsyncWorker) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(FIRST)
        self.n = 0
        self.need = 0
        self.waiter: asyncio.Future | None = None
        self.deadline = 0.0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.n:]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes
        if not self.need:
            if self.n < 8:
                return
            try:
                self.need = wire.frame_length(self.buf)
            except wire.FrameError as err:
                return self._fail(err)
            if self.need > len(self.buf):
                big = bytearray(self.need)
                big[:self.n] = memoryview(self.buf)[:self.n]
                self.buf = big
        if self.n < self.need:
            return
        if self.n > self.need or self.waiter is None:
            return self._fail(wire.FrameError("unrequested bytes from the worker"))
        if len(self.buf) > self.need:
            frame = self.buf[:self.need]  # a copy: the buffer is reused
        else:
            frame, self.buf = self.buf, bytearray(FIRST)  # hand the exact-size buffer over
        if len(self.buf) > FIRST:
            self.buf = bytearray(FIRST)
        self.n = self.need = 0
        self._settle(frame, None)

    def _settle(self, frame, err: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        self.owner._busy.discard(self)
        if waiter is not None and not isinstance(waiter, asyncio.Future):
            waiter(frame, err)  # a submit() callback
        elif waiter is not None and not waiter.done():
            if err is None:
                waiter.set_result(frame)
            else:
                waiter.set_exception(err)

    def _fail(self, err: Exception) -> None:
        self._settle(None, _Stale(err))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner._forget(self)
        self._settle(None, _Stale(exc or EOFError("connection closed by the worker")))

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _timed_out(self) -> None:
        self._settle(None, WorkerUnavailable(
            f"worker at {self.owner.socket_path} did not answer within {self.owner.timeout:g}s"))
        self.close()

    def send(self, parts: list, callback=None) -> asyncio.Future | None:
        """Write a frame; the reply settles a new future, or goes to ``callback(frame, err)``."""
        loop = self.owner.loop
        fut = None
        self.waiter = callback or (fut := loop.create_future())
        self.deadline = loop.time() + self.owner.timeout
        self.owner._watch(self)
        self.transport.writelines(parts)
        return fut


class AsyncWorker:
    """Event-loop client of one worker socket; use only from ``loop``'s thread."""

    def __init__(self, client: WorkerClient, loop: asyncio.AbstractEventLoop, *,
                 max_conns: int = 64) -> None:
        self.socket_path = client.socket_path
        self.timeout = client.timeout
        self.authkey = client.authkey
        self.loop = loop
        self.max_conns = max_conns
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._busy: set[_Conn] = set()  # connections awaiting a reply (deadline checks)
        self._sweeping = False

    def _watch(self, conn: _Conn) -> None:
        """Track a request's deadline; one periodic check, not a timer per request."""
        self._busy.add(conn)
        if not self._sweeping:
            self._sweeping = True
            self.loop.call_later(min(1.0, self.timeout / 4), self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn._timed_out()
        if self._busy:
            self.loop.call_later(min(1.0, self.timeout / 4), self._sweep)
        else:
            self._sweeping = False

    async def _connect(self) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        wire.tune(sock)
        try:
            async with asyncio.timeout(self.timeout):
                await self.loop.sock_connect(sock, self.socket_path)
                hello = await self._recv_exact(sock, wire.HELLO_LEN)
                answer, mine = wire.client_answer(hello, self.authkey)
                if mine is not None:
                    await self.loop.sock_sendall(sock, answer)
                    try:
                        proof = await self._recv_exact(sock, wire.DIGEST_LEN)
                    except EOFError as err:
                        raise PermissionError("the worker refused the auth key") from err
                    wire.client_verify(self.authkey, mine, proof)
            _, conn = await self.loop.create_unix_connection(lambda: _Conn(self), sock=sock)
        except PermissionError as err:
            sock.close()
            raise WorkerUnavailable(
                f"worker at {self.socket_path}: authentication failed ({err})") from err
        except TimeoutError as err:
            sock.close()
            raise WorkerUnavailable(f"worker at {self.socket_path} did not answer within "
                                    f"{self.timeout:g}s") from err
        except (OSError, EOFError, wire.FrameError) as err:
            sock.close()
            raise WorkerUnavailable(
                f"worker at {self.socket_path} is not reachable: {err}") from err
        return conn

    async def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.loop.sock_recv(sock, n - len(buf))
            if not chunk:
                raise EOFError("connection closed during the handshake")
            buf += chunk
        return buf

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        if self._open >= self.max_conns:
            fut = self.loop.create_future()
            self._waiters.append(fut)
            return await fut, True
        self._open += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def _release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _wake(self) -> None:
        """A slot freed up: let one waiter open a connection of its own."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(_Stale(EOFError("pooled connection closed")))
                return

    def _forget(self, conn: _Conn) -> None:
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake()

    def submit(self, msg: dict, done) -> None:
        """Send ``msg`` now and call ``done(reply, None)`` or ``done(None, error)`` later.

        The hot path: with an idle connection there is no task and no future,
        only this callback. Otherwise (no idle connection, or it turned out
        dead) it falls back to :meth:`request` in a task.
        """
        parts = wire.encode(msg)
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            if conn.closed:
                conn = None
        if conn is None:
            return self._in_task(parts, done)

        def on_frame(frame, err) -> None:
            if isinstance(err, _Stale):
                return self._in_task(parts, done)  # retried on a fresh connection
            if err is not None:
                return done(None, err)
            try:
                reply = wire.decode(frame)
            except wire.FrameError as ferr:
                conn.close()
                return done(None, WorkerUnavailable(
                    f"unexpected reply from the worker at {self.socket_path}: {ferr}"))
            self._release(conn)
            try:
                reply = check_reply(reply, self.socket_path)
            except (WorkerError, WorkerUnavailable) as werr:
                return done(None, werr)
            done(reply, None)

        conn.send(parts, on_frame)

    def _in_task(self, parts: list, done) -> None:
        def finished(task: asyncio.Task) -> None:
            if task.cancelled():
                done(None, WorkerUnavailable("request cancelled"))
            elif task.exception() is not None:
                done(None, task.exception())
            else:
                done(task.result(), None)

        self.loop.create_task(self._request(parts)).add_done_callback(finished)

    async def request(self, msg: dict) -> dict:
        """Send one request; the ok reply, or WorkerError / WorkerUnavailable."""
        return await self._request(wire.encode(msg))

    async def _request(self, parts: list) -> dict:
        for attempt in (0, 1):
            try:
                conn, pooled = await self._acquire()
                frame = await self._roundtrip(conn, parts)
            except _Stale as err:
                if attempt == 0:
                    logger.debug("stale connection to %s: %s", self.socket_path, err)
                    continue
                raise WorkerUnavailable(
                    f"worker at {self.socket_path} went away: {err.args[0]}") from err
            try:
                reply = wire.decode(frame)
            except wire.FrameError as err:
                conn.close()
                raise WorkerUnavailable(f"unexpected reply from the worker at "
                                        f"{self.socket_path}: {err}") from err
            self._release(conn)
            return check_reply(reply, self.socket_path)
        raise AssertionError("unreachable")

    async def _roundtrip(self, conn: _Conn, parts: list):
        try:
            return await conn.send(parts)
        except _Stale:
            raise
        except BaseException:
            conn.close()  # timed out or cancelled: a late reply would cross the next request
            raise

    def close(self) -> None:
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
