"""The KServe / Triton Open Inference Protocol v2 over HTTP/JSON, as a Flask blueprint.

The protocol itself lives in :class:`~edge_node.serving.service.V2Service`; this
blueprint drives it with blocking worker calls (the Flask test client, any WSGI
server). The node's own server (:mod:`edge_node.serving.server`) finds the
service on the blueprint (``bp.v2_service``) and answers the same routes on its
event loop, without Flask.

Routes (all JSON; errors are ``{"error": "..."}``)::

    GET  /v2                                server metadata
    GET  /v2/health/live                    200 while the process serves HTTP
    GET  /v2/health/ready                   200 ready / 503 not ready (see below)
    GET  /v2/models                         (extension) every served model and its readiness
    GET  /v2/models/<name>[/versions/<v>]   model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready     200 / 503
    POST /v2/models/<name>[/versions/<v>]/infer     tensors in, tensors out
    POST /v2/models/<name>[/versions/<v>]/classify  (extension) one image in, the answer out

Readiness follows Triton's default ``--strict-readiness``: the server is ready
when the registry has loaded (``registry.loaded``, default True) and every
registered app is ready; pass ``strict_readiness=False`` to need only the
former (apps then report readiness one by one at their ``/ready``). Not ready
is 503 (the spec says "4xx"; probes treat any non-200 alike).

Status codes: 400 malformed request / wrong name, shape, datatype / unreadable
image; 404 unknown model or version; 413 body over ``max_body_bytes``; 503 app
not ready or its worker unreachable; 500 the model failed. Tensors are JSON
``data`` or Triton's binary-tensor extension (see :mod:`.codec`). ``classify`` takes the image
as the raw body (any content type but multipart) or as multipart field ``file``.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from edge_node.worker.errors import WorkerError, WorkerUnavailable

from .codec import V2Error
from .service import Reply, V2Service, error_reply, json_reply, worker_error

logger = logging.getLogger(__name__)


def _resp(reply: Reply) -> Response:
    return Response(reply.body, reply.status, headers=reply.headers,
                    content_type=reply.content_type)


def make_v2_blueprint(registry, *, max_body_bytes: int = 16 << 20, strict_readiness: bool = True,
                      server_name: str = "aidc-edge", server_version: str = "0.1.0") -> Blueprint:
    """The v2 routes over ``registry`` (``get``, ``names``, ``on_result``)."""
    bp = Blueprint("v2", __name__)
    svc = V2Service(registry, max_body_bytes=max_body_bytes, strict_readiness=strict_readiness,
                    server_name=server_name, server_version=server_version)
    bp.v2_service = svc

    @bp.errorhandler(V2Error)
    def _v2_error(err: V2Error) -> Response:
        return _resp(error_reply(err))

    @bp.errorhandler(RequestEntityTooLarge)
    def _too_large(err) -> Response:
        return _resp(error_reply(svc.too_large()))

    @bp.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        return _resp(json_reply({"error": err.description or err.name}, err.code or 500))

    @bp.errorhandler(Exception)
    def _internal(err: Exception) -> Response:
        logger.exception("v2 request failed: %s %s", request.method, request.path)
        return _resp(json_reply({"error": f"internal error: {type(err).__name__}: {err}"}, 500))

    def call(app, fn, *args):
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except (WorkerError, WorkerUnavailable) as err:
            v2err = worker_error(app, err)
            svc.record(app.name, v2err.status, time.perf_counter() - t0)
            raise v2err from None
        svc.record(app.name, 200, time.perf_counter() - t0)
        return out

    def body_bytes() -> bytes:
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise RequestEntityTooLarge()
        try:
            request.max_content_length = max_body_bytes  # Flask >= 3.1: also caps chunked bodies
        except AttributeError:
            pass
        if request.mimetype == "multipart/form-data":
            f = request.files.get("file")
            if f is None:
                raise V2Error(400, "multipart request has no 'file' field")
            data = f.read(max_body_bytes + 1)
        else:
            data = request.get_data(cache=False)
        if len(data) > max_body_bytes:
            raise RequestEntityTooLarge()
        return data

    @bp.get("/v2")
    def server_metadata() -> Response:
        return _resp(svc.server_metadata())

    @bp.get("/v2/health/live")
    def live() -> Response:
        return _resp(svc.live())

    @bp.get("/v2/health/ready")
    def ready() -> Response:
        return _resp(svc.ready())

    @bp.get("/v2/models")
    def model_list() -> Response:
        return _resp(svc.model_list())

    @bp.get("/v2/models/<name>")
    @bp.get("/v2/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str | None = None) -> Response:
        app = svc.find(name, version)
        meta = svc.cached_meta(app)
        if meta is None:
            try:
                meta = app.client.meta()
            except (WorkerError, WorkerUnavailable) as err:
                meta = err
        return _resp(svc.model_metadata(app, meta))

    @bp.get("/v2/models/<name>/ready")
    @bp.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        return _resp(svc.model_ready(name, version))

    @bp.post("/v2/models/<name>/infer")
    @bp.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None = None) -> Response:
        svc.find(name, version, need_ready=True)
        raw = body_bytes()
        ic = svc.infer_request(name, version, raw,
                               request.headers.get("Inference-Header-Content-Length"))
        outputs = call(ic.app, ic.app.client.infer, ic.inputs, ic.ask)
        svc.report_infer(ic, outputs)
        return _resp(svc.infer_reply(ic, outputs))

    @bp.post("/v2/models/<name>/classify")
    @bp.post("/v2/models/<name>/versions/<version>/classify")
    def classify_image(name: str, version: str | None = None) -> Response:
        svc.find(name, version, need_ready=True)
        image = body_bytes()
        app = svc.classify_request(name, version, image)
        result, tensor = call(app, app.client.classify, image)
        svc.report_classify(app, result, tensor, image)
        return _resp(svc.classify_reply(app, result))

    return bp
