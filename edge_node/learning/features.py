"""Features for the head, computed by ONNX Runtime on the model itself.

The head's input tensor (``Head.feature``) is made a graph output of an
in-memory copy of the model (nothing is written to disk, the model file is not
touched); ONNX Runtime then returns it beside the class scores. Graph outputs
are never fused away by ORT's optimiser, so the features are exactly what the
deployed model feeds its head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .head import Head, load_model

#: ONNX elem types ORT may hand back for a feature tensor
_FLOAT_TYPES = {"float32": 1, "float16": 10, "float64": 11}


def feature_model(model, head: Head, with_scores: bool = False, scores: str | None = None):
    """A copy of ``model`` whose outputs are ``[head.feature]`` (and the class scores,
    ``scores`` or else ``head.output``, when ``with_scores``). Other outputs are
    dropped so ORT prunes what only they need (e.g. a label ArgMax). A feature that
    is a graph input is passed out through an Identity node."""
    from onnx import helper

    m = load_model(model)
    copy = type(m)()
    copy.CopyFrom(m)
    g = copy.graph
    keep = {o.name: o for o in g.output}
    scores = scores or head.output
    outs = []
    name = head.feature
    if name in {i.name for i in g.input}:
        name = f"{head.feature}__aidc_feature"
        g.node.append(helper.make_node("Identity", [head.feature], [name]))
    feat = next((v for v in list(g.value_info) + list(g.output) if v.name == name), None)
    if feat is None:
        feat = helper.make_tensor_value_info(name, _FLOAT_TYPES.get(head.dtype, 1), None)
    outs.append(feat)
    if with_scores and scores != head.feature:
        outs.append(keep[scores])
    del g.output[:]
    g.output.extend(outs)
    return copy


def _session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
               "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class FeatureExtractor:
    """Runs the model with the head's feature tensor exposed.

    ``fx(X)`` -> float32 features (n, n_features); with ``with_scores`` ->
    ``(features, scores)`` where scores are the class-score output (of ``scores``,
    the head, when ``head`` is a hidden layer: :func:`.head.find_body`). ``X`` is the
    model's input tensor batch (what the worker feeds after preprocessing), cast
    to the input's dtype; it is run ``batch_size`` rows at a time.
    """

    def __init__(self, model, head: Head, threads: int = 1, with_scores: bool = False,
                 scores: Head | None = None) -> None:
        self.head = head
        self.n_classes = (scores or head).n_classes
        self.with_scores = with_scores
        self.passthrough = False
        m = load_model(model)
        inits = {i.name for i in m.graph.initializer}
        inputs = [i for i in m.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ValueError(f"feature extraction needs a model with one input, not "
                             f"{len(inputs)} ({', '.join(i.name for i in inputs)})")
        out = scores.output if scores is not None else None
        self.session = _session(feature_model(m, head, with_scores, out).SerializeToString(),
                                threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = _ORT_DTYPES.get(inp.type, np.float32)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, X: np.ndarray, batch_size: int = 512) -> Any:
        X = np.asarray(X)
        feats, scores = [], []
        for start in range(0, max(len(X), 1), batch_size):
            chunk = np.ascontiguousarray(X[start:start + batch_size], dtype=self.input_dtype)
            if len(chunk) == 0:
                break
            res = self.session.run(self.outputs, {self.input_name: chunk})
            f = np.asarray(res[0])
            if f.ndim != 2 or f.shape[1] != self.head.n_features:
                raise ValueError(f"feature tensor {self.head.feature!r} has shape "
                                 f"{list(f.shape)}, expected (batch, {self.head.n_features})")
            feats.append(f.astype(np.float32, copy=False))
            if self.with_scores:
                scores.append(np.asarray(res[1], np.float32))
        if not feats:
            f = np.zeros((0, self.head.n_features), np.float32)
            s = np.zeros((0, self.n_classes), np.float32)
        else:
            f = np.concatenate(feats)
            s = np.concatenate(scores) if self.with_scores else None
        return (f, s) if self.with_scores else f


def extract_features(model, head: Head, X: np.ndarray, batch_size: int = 512,
                     threads: int = 1) -> np.ndarray:
    """Float32 features (n, head.n_features) of the model inputs ``X``."""
    return FeatureExtractor(model, head, threads)(X, batch_size)


def extract_many(model, head: Head, arrays: Sequence[np.ndarray], batch_size: int = 512,
                 threads: int = 1) -> list[np.ndarray]:
    """Features of several input arrays with one session."""
    fx = FeatureExtractor(model, head, threads)
    return [fx(X, batch_size) for X in arrays]
