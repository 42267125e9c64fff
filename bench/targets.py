"""Systems under test for the load harness: raw ONNX Runtime, an HTTP v2 URL, any callable.

A *target* is a small picklable description. The harness sends it to each
caller (a separate process by default) and calls ``target.open()`` there,
after pinning, to get ``call()``: one inference with the target's fixed input.
So a session, a socket or a connection is created in the caller that uses it,
never shared across processes, and anything expensive (building a JSON body,
creating a session) happens before the clock starts.

- :class:`OrtTarget` -- raw ``onnxruntime`` in the caller's process: the
  references B0/B1/B2.
- :class:`HttpV2Target` -- ``POST {url}/v2/models/{model}/infer`` (Open
  Inference Protocol v2, JSON or the binary-tensor extension) over one
  keep-alive connection per caller, TCP_NODELAY, reply read and parsed.
- :class:`CallableTarget` -- ``factory()`` returns ``fn(x)``; the factory must
  be importable by name (a module-level function or a ``functools.partial`` of
  one) when callers are processes. Any object with ``open() -> call`` and a
  ``label`` works too.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np

_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64",
           np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8"}


@dataclass(frozen=True)
class OrtTarget:
    """A raw ``onnxruntime`` session, created in the caller's process."""

    model_path: str
    input_name: str
    x: np.ndarray = field(repr=False)
    threads: int = 1  #: intra_op_num_threads (explicit: ORT then sets no thread affinity)
    spinning: bool | None = None  #: None keeps ORT's default (spinning on)
    label: str = "ort"

    def open(self) -> Callable[[], Any]:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning",
                                          "1" if self.spinning else "0")
        sess = ort.InferenceSession(self.model_path, opts, providers=["CPUExecutionProvider"])
        feed = {self.input_name: self.x}
        return lambda: sess.run(None, feed)


def v2_body(input_name: str, x: np.ndarray, binary: bool = False) -> tuple[bytes, dict]:
    """The request body and headers of one v2 infer call carrying ``x``."""
    tensor = {"name": input_name, "shape": list(x.shape), "datatype": _DTYPES[x.dtype]}
    if not binary:
        tensor["data"] = x.reshape(-1).tolist()
        return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(x).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + raw, {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(head))}


class V2Error(RuntimeError):
    """A v2 infer call answered with something other than 200."""


@dataclass(frozen=True)
class HttpV2Target:
    """``POST {url}/v2/models/{model}/infer`` over a keep-alive connection per caller."""

    url: str  #: e.g. http://127.0.0.1:8080
    model: str
    input_name: str
    x: np.ndarray = field(repr=False)
    binary: bool = False  #: the v2 binary-tensor extension instead of JSON data
    parse: bool = True  #: parse the JSON reply, as a real client would
    timeout_s: float = 30.0
    label: str = "http-v2"

    def open(self) -> Callable[[], Any]:
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = f"{parts.path.rstrip('/')}/v2/models/{self.model}/infer"
        body, headers = v2_body(self.input_name, self.x, self.binary)
        conn: list[http.client.HTTPConnection | None] = [None]

        def connect() -> http.client.HTTPConnection:
            c = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
            c.connect()
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c

        def call() -> Any:
            if conn[0] is None:
                conn[0] = connect()
            try:
                conn[0].request("POST", path, body, headers)
                resp = conn[0].getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                conn[0].close()
                conn[0] = None  # reconnect on the next call; this one counts as an error
                raise
            if resp.status != 200:
                raise V2Error(f"HTTP {resp.status}: {data[:200]!r}")
            return json.loads(data) if self.parse else data

        return call


@dataclass(frozen=True)
class CallableTarget:
    """``factory()`` -> ``fn(x)``, called with this target's ``x``."""

    factory: Callable[[], Callable[[np.ndarray], Any]]
    x: np.ndarray = field(repr=False)
    label: str = "callable"

    def open(self) -> Callable[[], Any]:
        fn, x = self.factory(), self.x
        return lambda: fn(x)
