"""The node's HTTP server: werkzeug, threaded, no per-request log line.

An access log line per inference costs time on the hot path and fills the
disk of a box nobody looks at; counts and latencies belong in metrics. TCP
Nagle is off so a small reply leaves at once.
"""

from __future__ import annotations

import threading

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    disable_nagle_algorithm = True

    def log_request(self, code="-", size="-") -> None:  # noqa: D102
        pass


def serve(app, host: str, port: int) -> tuple[BaseWSGIServer, threading.Thread]:
    server = make_server(host, port, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
