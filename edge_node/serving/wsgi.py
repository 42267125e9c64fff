"""Run a WSGI app (the node's Flask app) for one buffered request, off the event loop.

The event-loop server answers the inference hot path itself and hands every
other route (local API, metadata pages, errors Flask knows how to phrase) to
:func:`call_wsgi` in a small thread pool, so a slow handler never stalls the loop.
"""

from __future__ import annotations

import io
import sys
from urllib.parse import unquote_to_bytes

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date",
              "server", "upgrade"}


def environ_for(method: str, target: bytes, headers: dict[bytes, bytes], body: bytes,
                server: tuple[str, int], peer: tuple | None, http_version: str) -> dict:
    path, _, query = target.partition(b"?")
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{http_version}",
        "REMOTE_ADDR": peer[0] if peer else "",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers.items():
        key = name.decode("latin-1").upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            env["CONTENT_TYPE"] = value.decode("latin-1")
        elif key != "CONTENT_LENGTH":
            env["HTTP_" + key] = value.decode("latin-1")
    return env


def call_wsgi(app, environ: dict) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """(status, reason, headers without hop-by-hop ones, whole body)."""
    state: dict = {}

    def start_response(status: str, headers: list, exc_info=None):
        if exc_info is not None and state.get("sent"):
            raise exc_info[1].with_traceback(exc_info[2])
        state["status"], state["headers"] = status, headers
        return lambda data: chunks.append(data)

    chunks: list[bytes] = []
    result = app(environ, start_response)
    try:
        for data in result:
            if data:
                chunks.append(data)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    code, _, reason = state["status"].partition(" ")
    headers = [(k, v) for k, v in state["headers"] if k.lower() not in HOP_BY_HOP]
    return int(code), reason, headers, b"".join(chunks)
