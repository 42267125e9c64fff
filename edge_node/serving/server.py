"""The node's HTTP/1.1 server: one event loop, the v2 hot path without a framework.

``httptools`` (llhttp) parses; each keep-alive connection answers its requests
in order (pipelining works). The v2 routes (health, metadata, ``infer``,
``classify``) run on the loop itself: decode the body, one frame to the
model's worker over :class:`~edge_node.serving.aworker.AsyncWorker`, encode the
answer -- no thread hand-off. The result hook runs after the reply has been
written. Every other route goes to the WSGI app (the node's Flask app: local
API, Flask's own 404/405) in a small thread pool. TCP_NODELAY is on; bodies
over ``max_body_bytes`` get 413 and the connection is closed; idle keep-alive
connections are closed after ``idle_timeout`` seconds. uvloop is used when it
is installed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from edge_node.worker.client import WorkerClient
from edge_node.worker.errors import WorkerError, WorkerUnavailable

from .aworker import AsyncWorker
from .batching import Batcher
from .codec import V2Error
from .service import Reply, V2Service, error_reply, json_reply, worker_error
from .wsgi import call_wsgi, environ_for

logger = logging.getLogger(__name__)
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_PIPELINE = 32  # queued requests per connection before reading pauses


def route(method: bytes, path: str) -> tuple[str, str | None, str | None] | None:
    """(route, model name, version) for a v2 hot-path request, None for everything else."""
    parts = path.split("/")
    if len(parts) < 2 or parts[0] or parts[1] != "v2":
        return None
    n = len(parts)
    if method == b"GET":
        if n == 2:
            return "server", None, None
        if n == 4 and parts[2] == "health" and parts[3] in ("live", "ready"):
            return parts[3], None, None
        if n == 3 and parts[2] == "models":
            return "models", None, None
    if n < 4 or parts[2] != "models" or not parts[3]:
        return None
    name, rest = unquote(parts[3]), parts[4:]
    version = None
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = unquote(rest[1]), rest[2:]
    if method == b"GET" and not rest:
        return "metadata", name, version
    if method == b"GET" and rest == ["ready"]:
        return "model_ready", name, version
    if method == b"POST" and rest in (["infer"], ["classify"]):
        return rest[0], name, version
    return None


def internal_error(req, err: Exception) -> Reply:
    logger.error("request failed: %s %r", req.method, req.target, exc_info=err)
    return json_reply({"error": f"internal error: {type(err).__name__}: {err}"}, 500)


class _Request:
    __slots__ = ("method", "target", "headers", "body", "keep_alive", "version", "too_large")

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] | bytes = []
        self.too_large = False


class _Conn(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.req: _Request | None = None
        self.size = 0
        self.queue: deque[_Request] = deque()
        self.busy = self.paused = self.closing = False
        self.last = 0.0

    # -- transport events ----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last = self.server.loop.time()
        self.server.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.last = self.server.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._abort(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            self._abort(400, f"malformed HTTP request: {err}")

    def _abort(self, status: int, message: str) -> None:
        if not self.busy and not self.queue:
            self._write(json_reply({"error": message}, status), False)
        self.closing = True
        self.transport.close()

    # -- parser callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = _Request()
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        old = self.req.headers.get(key)
        self.req.headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        req, limit = self.req, self.server.max_body_bytes
        length = req.headers.get(b"content-length")
        try:
            over = length is not None and int(length) > limit
        except ValueError:
            over = False  # the parser rejects a bad length itself
        if over:
            req.too_large = True
            if not self.busy and not self.queue:  # say it now: the client may await 100
                self._write(error_reply(self.server.service.too_large()), False)
                self.closing = True
        elif req.headers.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.req
        self.size += len(body)
        if req.too_large:
            if self.size > 4 * self.server.max_body_bytes + (1 << 20):
                self.transport.close()  # not worth reading to the end
            return
        if self.size > self.server.max_body_bytes:
            req.too_large = True
            req.body = []
            return
        req.body.append(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        req.body = b"".join(req.body) if len(req.body) != 1 else req.body[0]
        if self.closing:  # the 413 has been sent; drop the connection once the body is in
            self.transport.close()
            return
        self.queue.append(req)
        if len(self.queue) > MAX_PIPELINE and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if not self.busy:
            self._next()

    # -- answering -------------------------------------------------------------
    def _next(self) -> None:
        while self.queue and not self.busy and not self.closing:
            req = self.queue.popleft()
            if req.too_large:
                self._write(error_reply(self.server.service.too_large()), False)
                self.transport.close()
                return
            self.busy = True
            out = self.server.dispatch(req, self)
            if out is None:
                continue  # the server calls finish() when the worker answers
            if isinstance(out, Reply):
                self.busy = False
                self._write(out, req.keep_alive, req.method == b"HEAD")
                continue
            self.server.loop.create_task(self._finish(req, out))
        if self.paused and len(self.queue) < MAX_PIPELINE // 2 and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    async def _finish(self, req: _Request, coro) -> None:
        hook = None
        try:
            out = await coro
            reply, hook = out if isinstance(out, tuple) else (out, None)
        except V2Error as err:
            reply = error_reply(err)
        except Exception as err:
            reply = internal_error(req, err)
        self.finish(req, reply, hook)

    def finish(self, req: _Request, reply: Reply, hook: tuple | None = None) -> None:
        """Answer ``req`` (the one in progress), run its result hook, go on with the next."""
        self._write(reply, req.keep_alive, req.method == b"HEAD")
        self.busy = False
        if hook is not None:
            self.server.loop.call_soon(*hook)
        self._next()

    def _write(self, reply: Reply, keep_alive: bool, head_only: bool = False) -> None:
        if self.transport.is_closing():
            return
        body = b"" if head_only else reply.body
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s" % (
            _status_line(reply.status), reply.content_type.encode("latin-1"), len(reply.body),
            self.server.date_header())
        if reply.headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers).encode("latin-1")
        head += b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"
        if len(body) < 16384:
            self.transport.write(head + body)
        else:
            self.transport.writelines([head, body])
        if not keep_alive:
            self.closing = True
            self.transport.close()


_STATUS: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS.get(status)
    if line is None:
        line = _STATUS[status] = f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n".encode()
    return line


class HttpServer:
    """Serve ``service`` (v2 hot path) and ``wsgi_app`` (everything else) on ``host:port``.

    ``start()`` binds (errors surface in the caller) and runs the loop in a
    thread named ``http``; ``server_port``/``url`` tell where; ``shutdown()``
    closes the listener and every connection and joins the thread.
    """

    def __init__(self, host: str, port: int, service: V2Service | None = None, wsgi_app=None,
                 *, max_body_bytes: int | None = None, wsgi_threads: int = 4,
                 idle_timeout: float = 75.0, use_uvloop: bool = True) -> None:
        if service is None and wsgi_app is None:
            raise ValueError("nothing to serve: give a V2Service, a WSGI app or both")
        self.host, self.port = host, port
        self.service, self.wsgi_app = service, wsgi_app
        self.max_body_bytes = max_body_bytes or (service.max_body_bytes if service else 16 << 20)
        self.idle_timeout = idle_timeout
        self.use_uvloop = use_uvloop
        self.conns: set[_Conn] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(max_workers=wsgi_threads, thread_name_prefix="http-wsgi")
        self._workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: WorkerClient -> (app name, Batcher) for apps with dynamic batching
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._date = (0, b"")

    # -- lifecycle -------------------------------------------------------------
    @property
    def server_port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server_port}"

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.use_uvloop:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def start(self) -> HttpServer:
        self._sock = socket.create_server((self.host, self.port), backlog=512,
                                          family=socket.AF_INET6 if ":" in self.host
                                          else socket.AF_INET)
        self.loop = self._new_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="http",
                                        daemon=True)
        self._thread.start()
        started.wait()
        return self

    def _run(self, started: threading.Event) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: _Conn(self), sock=self._sock))
        loop.call_later(self.idle_timeout / 3, self._sweep)
        started.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for conn in list(self.conns):
                conn.transport.close()
            for aw in list(self._workers.values()):
                aw.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            self._stopped.set()

    def _sweep(self) -> None:
        cutoff = self.loop.time() - self.idle_timeout
        for conn in list(self.conns):
            if not conn.busy and not conn.queue and conn.last < cutoff:
                conn.transport.close()
        self.loop.call_later(self.idle_timeout / 3, self._sweep)

    def shutdown(self) -> None:
        if self.loop is not None and not self._stopped.is_set():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def date_header(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
        return self._date[1]

    # -- requests --------------------------------------------------------------
    def dispatch(self, req: _Request, conn: _Conn) -> Reply | object | None:
        """A :class:`Reply` now, a coroutine giving one (or ``(reply, hook)``), or None
        when the answer will come through ``conn.finish`` (the worker's callback)."""
        transport = conn.transport
        path = req.target.partition(b"?")[0].decode("latin-1")
        hit = route(req.method, path) if self.service is not None else None
        if hit is None:
            return self._wsgi(req, transport)
        kind, name, version = hit
        svc = self.service
        try:
            if kind == "infer":
                return self._infer_now(req, conn, name, version)
            if kind == "classify":
                return self._classify_now(req, conn, name, version)
            if kind == "live":
                return svc.live()
            if kind == "ready":
                return svc.ready()
            if kind == "server":
                return svc.server_metadata()
            if kind == "models":
                return svc.model_list()
            if kind == "model_ready":
                return svc.model_ready(name, version)
            return self._metadata(name, version)
        except V2Error as err:
            return error_reply(err)

    def _worker(self, client) -> AsyncWorker | None:
        if not isinstance(client, WorkerClient):
            return None
        aw = self._workers.get(client)
        if aw is None:
            aw = self._workers[client] = AsyncWorker(client, self.loop)
        return aw

    def _batcher(self, app, aw: AsyncWorker) -> Batcher:
        entry = self._batchers.get(app.client)
        if entry is None or entry[1].policy != app.batch:
            entry = self._batchers[app.client] = (app.name, Batcher(aw, app.batch, self.loop,
                                                                    app.name))
        return entry[1]

    def batching_stats(self) -> dict[str, dict]:
        """{app: the batcher's policy and counters} for apps that batch."""
        return {name: b.snapshot() for name, b in list(self._batchers.values())}

    async def _ask_timed(self, app, t0: float, msg: dict, blocking) -> dict:
        """:meth:`_ask`, counting a failure in the app's stats."""
        try:
            return await self._ask(app, msg, blocking)
        except V2Error as err:
            self.service.record(app.name, err.status, time.perf_counter() - t0)
            raise

    async def _ask(self, app, msg: dict, blocking) -> dict:
        aw = self._worker(app.client)
        try:
            if aw is not None:
                return await aw.request(msg)
            return await self.loop.run_in_executor(self._pool, blocking)
        except (WorkerError, WorkerUnavailable) as err:
            raise worker_error(app, err) from None

    def _infer_now(self, req: _Request, conn: _Conn, name: str, version: str | None):
        """Decode, send to the worker, answer from its callback: no task, no future."""
        svc = self.service
        hdr = req.headers.get(b"inference-header-content-length")
        call = svc.infer_request(name, version, req.body, hdr.decode() if hdr else None)
        aw = self._worker(call.app.client)
        if aw is None:
            return self._infer(req, name, version)
        t0 = time.perf_counter()

        def done(reply: dict | None, err: Exception | None) -> None:
            hook = None
            try:
                if err is not None:
                    raise err
                outputs = reply["outputs"]
                answer = svc.infer_reply(call, outputs)
                hook = (svc.report_infer, call, outputs)
            except (WorkerError, WorkerUnavailable) as werr:
                answer = error_reply(worker_error(call.app, werr))
            except V2Error as verr:
                answer = error_reply(verr)
            except Exception as exc:
                answer = internal_error(req, exc)
            svc.record(call.app.name, answer.status, time.perf_counter() - t0)
            conn.finish(req, answer, hook)

        submit = aw.submit if call.app.batch is None else self._batcher(call.app, aw).submit
        submit({"op": "infer", "inputs": call.inputs, "outputs": call.ask}, done)
        return None

    def _classify_now(self, req: _Request, conn: _Conn, name: str, version: str | None):
        svc = self.service
        svc.find(name, version, need_ready=True)
        ctype = req.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        app = self.service.registry.get(name)
        aw = self._worker(app.client)
        if ctype == b"multipart/form-data" or aw is None:
            return self._classify(req, name, version)
        image = req.body
        app = svc.classify_request(name, version, image)
        t0 = time.perf_counter()

        def done(reply: dict | None, err: Exception | None) -> None:
            hook = None
            try:
                if err is not None:
                    raise err
                answer = svc.classify_reply(app, reply["result"])
                hook = (svc.report_classify, app, reply["result"], reply["input"], image)
            except (WorkerError, WorkerUnavailable) as werr:
                answer = error_reply(worker_error(app, werr))
            except Exception as exc:
                answer = internal_error(req, exc)
            svc.record(app.name, answer.status, time.perf_counter() - t0)
            conn.finish(req, answer, hook)

        aw.submit({"op": "classify", "image": image}, done)
        return None

    async def _infer(self, req: _Request, name: str, version: str | None):
        svc = self.service
        hdr = req.headers.get(b"inference-header-content-length")
        call = svc.infer_request(name, version, req.body, hdr.decode() if hdr else None)
        app = call.app
        t0 = time.perf_counter()
        reply = await self._ask_timed(app, t0, {"op": "infer", "inputs": call.inputs,
                                                "outputs": call.ask},
                                      lambda: {"outputs": app.client.infer(call.inputs, call.ask)})
        svc.record(app.name, 200, time.perf_counter() - t0)
        outputs = reply["outputs"]
        return svc.infer_reply(call, outputs), (svc.report_infer, call, outputs)

    async def _classify(self, req: _Request, name: str, version: str | None):
        svc = self.service
        svc.find(name, version, need_ready=True)
        ctype = req.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype == b"multipart/form-data":  # rare: let the Flask route parse the form
            return await self._wsgi(req, None)
        image = req.body
        app = svc.classify_request(name, version, image)

        def blocking() -> dict:
            result, tensor = app.client.classify(image)
            return {"result": result, "input": tensor}

        t0 = time.perf_counter()
        reply = await self._ask_timed(app, t0, {"op": "classify", "image": image}, blocking)
        svc.record(app.name, 200, time.perf_counter() - t0)
        result = reply["result"]
        return svc.classify_reply(app, result), (svc.report_classify, app, result,
                                                 reply["input"], image)

    async def _metadata(self, name: str, version: str | None) -> Reply:
        svc = self.service
        app = svc.find(name, version)
        meta = svc.cached_meta(app)
        if meta is None:
            try:
                meta = (await self._ask(app, {"op": "meta"},
                                        lambda: {"meta": app.client.meta()}))["meta"]
            except V2Error as err:
                meta = err
        return svc.model_metadata(app, meta)

    async def _wsgi(self, req: _Request, transport) -> Reply:
        if self.wsgi_app is None:
            return json_reply({"error": "not found"}, 404)
        sock = (self.host, self.server_port)  # HEAD runs as GET; _write drops the body
        peer = transport.get_extra_info("peername") if transport is not None else None
        method = "GET" if req.method == b"HEAD" else req.method.decode("latin-1")
        env = environ_for(method, req.target, req.headers, req.body,
                          sock, peer, req.version)
        status, _, headers, body = await self.loop.run_in_executor(
            self._pool, call_wsgi, self.wsgi_app, env)
        ctype = next((v for k, v in headers if k.lower() == "content-type"),
                     "application/octet-stream")
        return Reply(status, body, ctype, [(k, v) for k, v in headers
                                           if k.lower() != "content-type"])
