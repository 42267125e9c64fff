"""The node's HTTP server: the event-loop server of :mod:`edge_node.serving.server`.

:func:`serve` takes the node's Flask app as before. When a v2 blueprint made by
:func:`~edge_node.serving.v2.make_v2_blueprint` is registered on it, its
service answers the v2 routes (``infer``, ``classify``, health, metadata) on
the event loop, without Flask; every other route runs through Flask in a small
thread pool. No access log line per request: on a box nobody looks at, counts
and latencies belong in metrics. TCP Nagle is off so a small reply leaves at once.
"""

from __future__ import annotations

import threading

from .serving.server import HttpServer
from .serving.service import V2Service


def v2_service_of(app) -> V2Service | None:
    """The :class:`V2Service` of the v2 blueprint registered on a Flask ``app``, if any."""
    for bp in getattr(app, "blueprints", {}).values():
        svc = getattr(bp, "v2_service", None)
        if isinstance(svc, V2Service):
            return svc
    return None


def serve(app, host: str, port: int, *, service: V2Service | None = None
          ) -> tuple[HttpServer, threading.Thread]:
    """Start serving ``app`` (WSGI) on ``host:port``; ``(server, thread)``.

    ``service`` defaults to the one found on ``app``'s v2 blueprint. The server
    has ``server_port`` and ``shutdown()``, like werkzeug's.
    """
    service = service or v2_service_of(app)
    limit = getattr(app, "config", {}).get("MAX_CONTENT_LENGTH") if app is not None else None
    server = HttpServer(host, port, service, app, max_body_bytes=limit).start()
    return server, server._thread
