"""The KServe / Triton Open Inference Protocol v2 over HTTP/JSON, as a Flask blueprint.

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
not ready or its worker unreachable; 500 the model failed. Only JSON tensor
``data`` is supported (no binary-data extension). ``classify`` takes the image
as the raw body (any content type but multipart) or as multipart field ``file``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from edge_node.worker.errors import WorkerError, WorkerUnavailable
from edge_node.worker.postprocess import classify
from edge_node.worker.tensors import NP_TO_V2

from .codec import V2Error, decode_infer_request, encode_tensor
from .registry import ServedApp

logger = logging.getLogger(__name__)
PLATFORM = "onnxruntime_onnx"
MAX_REPORTED = 64  # batch items per request passed to on_result


def _json(obj: object, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, mimetype="application/json")


def _manifest_tensors(specs) -> list[dict]:
    return [{"name": t.name, "datatype": NP_TO_V2.get(t.dtype, t.dtype),
             "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape]}
            for t in specs]


def make_v2_blueprint(registry, *, max_body_bytes: int = 16 << 20, strict_readiness: bool = True,
                      server_name: str = "aidc-edge", server_version: str = "0.1.0") -> Blueprint:
    """The v2 routes over ``registry`` (``get``, ``names``, ``on_result``)."""
    bp = Blueprint("v2", __name__)
    meta_cache: dict[tuple[str, str], dict] = {}

    @bp.errorhandler(V2Error)
    def _v2_error(err: V2Error) -> Response:
        return _json({"error": err.message}, err.status)

    @bp.errorhandler(RequestEntityTooLarge)
    def _too_large(err) -> Response:
        return _json({"error": f"request body over the {max_body_bytes} byte limit"}, 413)

    @bp.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        return _json({"error": err.description or err.name}, err.code or 500)

    @bp.errorhandler(Exception)
    def _internal(err: Exception) -> Response:
        logger.exception("v2 request failed: %s %s", request.method, request.path)
        return _json({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    def find(name: str, version: str | None, need_ready: bool = False) -> ServedApp:
        app = registry.get(name)
        if app is None:
            raise V2Error(404, f"unknown model {name!r}")
        if version is not None and version != app.version:
            raise V2Error(404, f"model {name!r} has no version {version!r} (serving {app.version})")
        if need_ready and not app.ready:
            raise V2Error(503, f"model {name!r} is not ready")
        return app

    def call(app: ServedApp, fn, *args):
        try:
            return fn(*args)
        except WorkerError as err:
            raise V2Error(err.status if 400 <= err.status < 600 else 500, err.message) from None
        except WorkerUnavailable as err:
            raise V2Error(503, f"model {app.name!r} is unavailable: {err}") from None

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

    def report(app: ServedApp, result: dict, tensor, image: bytes | None, source: str) -> None:
        try:
            registry.on_result(app, result, tensor, image, source)
        except Exception:
            logger.exception("on_result hook failed for %s (request still answered)", app.name)

    def report_infer(app: ServedApp, inputs: dict, outputs: dict) -> None:
        m = app.manifest
        post = m.postprocess
        out_name = post.output or m.model.outputs[0].name
        if out_name not in outputs:
            return
        scores = np.asarray(outputs[out_name])
        x = inputs.get((m.preprocess.input if m.preprocess else None) or m.model.inputs[0].name)
        n = scores.shape[0] if scores.ndim > 1 else 1
        for i in range(min(n, MAX_REPORTED)):
            try:
                result = classify(scores[i:i + 1] if scores.ndim > 1 else scores, post, app.labels)
            except ValueError as err:
                logger.warning("cannot classify the output of %s: %s", app.name, err)
                return
            same_batch = x is not None and x.ndim > 0 and x.shape[0] == n
            report(app, result, x[i:i + 1] if same_batch else x, None, "v2-infer")

    @bp.get("/v2")
    def server_metadata() -> Response:
        return _json({"name": server_name, "version": server_version,
                      "extensions": ["classify", "model_list"]})

    @bp.get("/v2/health/live")
    def live() -> Response:
        return _json({"live": True})

    @bp.get("/v2/health/ready")
    def ready() -> Response:
        apps = [a for a in (registry.get(n) for n in registry.names()) if a is not None]
        waiting = [a.name for a in apps if not a.ready]
        loaded = bool(getattr(registry, "loaded", True))
        ok = loaded and not (strict_readiness and waiting)
        return _json({"ready": ok, "loaded": loaded, "not_ready": waiting}, 200 if ok else 503)

    @bp.get("/v2/models")
    def model_list() -> Response:
        apps = [a for a in (registry.get(n) for n in registry.names()) if a is not None]
        return _json({"models": [{"name": a.name, "version": a.version, "ready": a.ready}
                                 for a in apps]})

    @bp.get("/v2/models/<name>")
    @bp.get("/v2/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str | None = None) -> Response:
        app = find(name, version)
        key = (app.name, app.sha256)
        if key not in meta_cache:
            try:
                meta_cache[key] = app.client.meta()
            except (WorkerError, WorkerUnavailable):
                meta = {"inputs": _manifest_tensors(app.manifest.model.inputs),
                        "outputs": _manifest_tensors(app.manifest.model.outputs)}
                return _json({"name": app.name, "versions": [app.version],
                              "platform": PLATFORM, **meta})
        meta = meta_cache[key]
        return _json({"name": app.name, "versions": [app.version], "platform": PLATFORM,
                      "inputs": meta["inputs"], "outputs": meta["outputs"]})

    @bp.get("/v2/models/<name>/ready")
    @bp.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        app = find(name, version)
        return _json({"name": app.name, "ready": app.ready}, 200 if app.ready else 503)

    @bp.post("/v2/models/<name>/infer")
    @bp.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None = None) -> Response:
        app = find(name, version, need_ready=True)
        raw = body_bytes()
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise V2Error(400, f"request body is not valid JSON: {err}") from None
        req_id, inputs, wanted = decode_infer_request(body)
        m = app.manifest
        is_cls = m.task == "classification" and m.postprocess is not None
        ask = wanted
        if is_cls and wanted is not None:
            ask = list(dict.fromkeys([*wanted, m.postprocess.output or m.model.outputs[0].name]))
        outputs = call(app, app.client.infer, inputs, ask)
        if is_cls:
            report_infer(app, inputs, outputs)
        resp = {"model_name": app.name, "model_version": app.version,
                "outputs": [encode_tensor(n, outputs[n]) for n in (wanted or outputs)]}
        if req_id is not None:
            resp["id"] = req_id
        return _json(resp)

    @bp.post("/v2/models/<name>/classify")
    @bp.post("/v2/models/<name>/versions/<version>/classify")
    def classify_image(name: str, version: str | None = None) -> Response:
        app = find(name, version, need_ready=True)
        image = body_bytes()
        if not image:
            raise V2Error(400, "no image: send it as the request body or as multipart field 'file'")
        result, tensor = call(app, app.client.classify, image)
        report(app, result, tensor, image, "v2-classify")
        return _json({**result, "model_name": app.name, "model_version": app.version})

    return bp
