"""The Open Inference Protocol v2, independent of any web framework.

:class:`V2Service` turns requests into :class:`Reply` objects (status, body,
content type, extra headers). Two front ends drive it: the Flask blueprint
(:mod:`edge_node.serving.v2`, blocking worker calls) and the event-loop server
(:mod:`edge_node.serving.server`, the hot path). Calls to the worker happen
between a ``*_request`` step and a ``*_reply`` step, so each front end can make
them its own way. The result hook (:meth:`report_infer`, :meth:`report_classify`)
is separate so the event-loop server can run it after the reply has left.

Errors are :class:`~edge_node.serving.codec.V2Error` (status + message),
answered as ``{"error": message}``.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from edge_node.worker.errors import WorkerError, WorkerUnavailable
from edge_node.worker.postprocess import classify
from edge_node.worker.tensors import NP_TO_V2

from .codec import V2Error, decode_infer_request, encode_outputs
from .registry import ServedApp

logger = logging.getLogger(__name__)
PLATFORM = "onnxruntime_onnx"
MAX_REPORTED = 64  # batch items per request passed to on_result
JSON = "application/json"
_dumps = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class InferCall:
    """A decoded infer request, between decoding and the worker's answer."""

    app: ServedApp
    inputs: dict[str, np.ndarray]
    ask: list[str] | None  # what the worker is asked for
    wanted: list[str] | None  # what the caller asked for
    req_id: object
    binary: set[str] | bool  # outputs to send as binary (True: all)
    is_cls: bool


def json_reply(obj: object, status: int = 200) -> Reply:
    return Reply(status, _dumps(obj).encode())


def error_reply(err: V2Error) -> Reply:
    return json_reply({"error": err.message}, err.status)


def worker_error(app: ServedApp, err: Exception) -> V2Error:
    """The v2 error for a failed worker call (its own status, or 503 when unreachable)."""
    if isinstance(err, WorkerError):
        return V2Error(err.status if 400 <= err.status < 600 else 500, err.message)
    if isinstance(err, WorkerUnavailable):
        return V2Error(503, f"model {app.name!r} is unavailable: {err}")
    raise err


def _manifest_tensors(specs) -> list[dict]:
    return [{"name": t.name, "datatype": NP_TO_V2.get(t.dtype, t.dtype),
             "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape]}
            for t in specs]


#: upper bounds (seconds) of the per-app latency histogram buckets (+Inf implied)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AppStats:
    """Counters of one app's inference requests (infer + classify)."""

    __slots__ = ("requests", "errors", "buckets", "latency_sum")

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def snapshot(self) -> dict:
        cum, total = {}, 0
        for le, n in zip((*LATENCY_BUCKETS, "+Inf"), self.buckets, strict=True):
            total += n
            cum[str(le)] = total
        return {"requests": self.requests, "errors": self.errors,
                "latency_seconds_sum": self.latency_sum, "latency_seconds_buckets": cum}


class V2Service:
    def __init__(self, registry, *, max_body_bytes: int = 16 << 20, strict_readiness: bool = True,
                 server_name: str = "aidc-edge", server_version: str = "0.1.0") -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.strict_readiness = strict_readiness
        self.server_name, self.server_version = server_name, server_version
        self._meta_cache: dict[tuple[str, str], dict] = {}
        self._stats: dict[str, AppStats] = {}
        self._stats_lock = threading.Lock()

    # -- per-app counters (for /metrics and the status page) -------------------
    def record(self, app: str, status: int, seconds: float) -> None:
        """Count one answered infer/classify request of ``app``; 5xx counts as an error."""
        st = self._stats.get(app)
        if st is None:
            with self._stats_lock:
                st = self._stats.setdefault(app, AppStats())
        st.requests += 1
        if status >= 500:
            st.errors += 1
        st.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        st.latency_sum += seconds

    def stats(self) -> dict[str, dict]:
        """``{app: {"requests", "errors", "latency_seconds_sum", "latency_seconds_buckets"}}``
        (buckets cumulative, Prometheus style, keyed by upper bound)."""
        with self._stats_lock:
            items = list(self._stats.items())
        return {name: st.snapshot() for name, st in items}

    # -- lookups -------------------------------------------------------------
    def find(self, name: str, version: str | None, need_ready: bool = False) -> ServedApp:
        app = self.registry.get(name)
        if app is None:
            raise V2Error(404, f"unknown model {name!r}")
        if version is not None and version != app.version:
            raise V2Error(404, f"model {name!r} has no version {version!r} (serving {app.version})")
        if need_ready and not app.ready:
            raise V2Error(503, f"model {name!r} is not ready")
        return app

    def _apps(self) -> list[ServedApp]:
        return [a for a in (self.registry.get(n) for n in self.registry.names()) if a is not None]

    # -- cheap routes --------------------------------------------------------
    def server_metadata(self) -> Reply:
        return json_reply({"name": self.server_name, "version": self.server_version,
                           "extensions": ["classify", "model_list", "binary_tensor_data"]})

    def live(self) -> Reply:
        return json_reply({"live": True})

    def ready(self) -> Reply:
        waiting = [a.name for a in self._apps() if not a.ready]
        loaded = bool(getattr(self.registry, "loaded", True))
        ok = loaded and not (self.strict_readiness and waiting)
        return json_reply({"ready": ok, "loaded": loaded, "not_ready": waiting}, 200 if ok else 503)

    def model_list(self) -> Reply:
        return json_reply({"models": [{"name": a.name, "version": a.version, "ready": a.ready}
                                      for a in self._apps()]})

    def model_ready(self, name: str, version: str | None) -> Reply:
        app = self.find(name, version)
        return json_reply({"name": app.name, "ready": app.ready}, 200 if app.ready else 503)

    # -- model metadata: the worker's real tensors, cached per package --------
    def cached_meta(self, app: ServedApp) -> dict | None:
        return self._meta_cache.get((app.name, app.sha256))

    def model_metadata(self, app: ServedApp, meta: dict | Exception | None) -> Reply:
        """The reply given the worker's ``meta`` (or the error fetching it: manifest fallback)."""
        if isinstance(meta, dict):
            self._meta_cache[(app.name, app.sha256)] = meta
        else:
            meta = {"inputs": _manifest_tensors(app.manifest.model.inputs),
                    "outputs": _manifest_tensors(app.manifest.model.outputs)}
        return json_reply({"name": app.name, "versions": [app.version], "platform": PLATFORM,
                           "inputs": meta["inputs"], "outputs": meta["outputs"]})

    # -- infer ---------------------------------------------------------------
    def infer_request(self, name: str, version: str | None, body: bytes,
                      header_length: str | None = None) -> InferCall:
        """Decode a request (JSON, or the binary-tensor extension when ``header_length``)."""
        app = self.find(name, version, need_ready=True)
        req_id, inputs, wanted, binary = decode_infer_request(body, header_length)
        m = app.manifest
        is_cls = m.task == "classification" and m.postprocess is not None
        ask = wanted
        if is_cls and wanted is not None:
            ask = list(dict.fromkeys([*wanted, m.postprocess.output or m.model.outputs[0].name]))
        return InferCall(app, inputs, ask, wanted, req_id, binary, is_cls)

    def infer_reply(self, call: InferCall, outputs: dict[str, np.ndarray]) -> Reply:
        app = call.app
        head = {"model_name": app.name, "model_version": app.version}
        if call.req_id is not None:
            head["id"] = call.req_id
        names = call.wanted or list(outputs)
        header, blobs = encode_outputs(head, [(n, outputs[n]) for n in names], call.binary)
        if not blobs:
            return Reply(200, header)
        return Reply(200, b"".join([header, *blobs]), "application/octet-stream",
                     [("Inference-Header-Content-Length", str(len(header)))])

    def report_infer(self, call: InferCall, outputs: dict[str, np.ndarray]) -> None:
        """Hand each classified batch item (at most 64) to the registry's result hook."""
        if not call.is_cls or getattr(self.registry, "result_callback", True) is None:
            return
        app, m = call.app, call.app.manifest
        post = m.postprocess
        out_name = post.output or m.model.outputs[0].name
        if out_name not in outputs:
            return
        scores = np.asarray(outputs[out_name])
        x = call.inputs.get((m.preprocess.input if m.preprocess else None)
                            or m.model.inputs[0].name)
        n = scores.shape[0] if scores.ndim > 1 else 1
        same_batch = x is not None and x.ndim > 0 and x.shape[0] == n
        for i in range(min(n, MAX_REPORTED)):
            try:
                result = classify(scores[i:i + 1] if scores.ndim > 1 else scores, post, app.labels)
            except ValueError as err:
                logger.warning("cannot classify the output of %s: %s", app.name, err)
                return
            self._report(app, result, x[i:i + 1] if same_batch else x, None, "v2-infer")

    # -- classify ------------------------------------------------------------
    def classify_request(self, name: str, version: str | None, image: bytes) -> ServedApp:
        app = self.find(name, version, need_ready=True)
        if not image:
            raise V2Error(400, "no image: send it as the request body or as multipart field 'file'")
        return app

    def classify_reply(self, app: ServedApp, result: dict) -> Reply:
        return json_reply({**result, "model_name": app.name, "model_version": app.version})

    def report_classify(self, app: ServedApp, result: dict, tensor, image: bytes) -> None:
        self._report(app, result, tensor, image, "v2-classify")

    def _report(self, app: ServedApp, result: dict, tensor, image: bytes | None,
                source: str) -> None:
        try:
            self.registry.on_result(app, result, tensor, image, source)
        except Exception:
            logger.exception("on_result hook failed for %s (request still answered)", app.name)

    def too_large(self) -> V2Error:
        return V2Error(413, f"request body over the {self.max_body_bytes} byte limit")
