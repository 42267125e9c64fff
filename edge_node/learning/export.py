"""Write a trained head back into a copy of the model, and check the result.

The copy differs from the base model only in the head's two initializers
(same names, shapes, dtypes and storage orientation; Gemm ``alpha``/``beta``
undone); every node, input, output, opset and other initializer is kept, which
:func:`check_same_graph` verifies. :func:`validate` then loads the new file in
ONNX Runtime and checks, on a probe batch of real inputs, that its class
scores equal numpy's ``softmax(features @ W + b)`` from the features that same
model computes, and that those features equal the base model's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .head import Head, load_model
from .train import head_scores


class ExportError(Exception):
    """The exported model is not a faithful copy with the new head."""


def _stored(head: Head, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(W, b)`` in the head's own terms -> the initializers' values as stored."""
    W = np.asarray(W, np.float64)
    if W.shape != (head.n_features, head.n_classes):
        raise ValueError(f"W has shape {list(W.shape)}, the head needs "
                         f"({head.n_features}, {head.n_classes})")
    w = W / head.alpha
    w = (w.T if head.trans_b else w).astype(head.dtype)
    if head.bias is None:
        if np.any(np.asarray(b) != 0):
            raise ValueError("the head has no bias: b must be zeros")
        return w, None
    return w, (np.asarray(b, np.float64).reshape(-1) / head.beta).astype(head.dtype)


def write_head(model, head: Head, W: np.ndarray, b: np.ndarray):
    """A copy of ``model`` (path, bytes or ModelProto) with the head's weights replaced."""
    from onnx import numpy_helper

    base = load_model(model)
    new = type(base)()
    new.CopyFrom(base)
    w, bias = _stored(head, W, b)
    for init in new.graph.initializer:
        if init.name == head.weight:
            value = w
        elif head.bias is not None and init.name == head.bias:
            value = bias.reshape(tuple(init.dims))
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
    return new


def check_same_graph(base, new, head: Head) -> None:
    """Everything but the head's initializer values is identical; shapes and dtypes too."""
    from onnx import numpy_helper

    a, b = load_model(base), load_model(new)
    same = [("nodes", list(a.graph.node), list(b.graph.node)),
            ("inputs", list(a.graph.input), list(b.graph.input)),
            ("outputs", list(a.graph.output), list(b.graph.output)),
            ("opsets", list(a.opset_import), list(b.opset_import))]
    for what, x, y in same:
        if x != y:
            raise ExportError(f"the exported model's {what} differ from the base model's")
    if a.ir_version != b.ir_version:
        raise ExportError("the exported model's IR version differs")
    ia = {i.name: i for i in a.graph.initializer}
    ib = {i.name: i for i in b.graph.initializer}
    if list(ia) != list(ib):
        raise ExportError("the exported model's initializers are not the base model's")
    head_inits = {head.weight, head.bias}
    for name, init in ia.items():
        other = ib[name]
        if name in head_inits:
            if (list(init.dims), init.data_type) != (list(other.dims), other.data_type):
                raise ExportError(f"initializer {name!r} changed shape or dtype")
            if not np.all(np.isfinite(numpy_helper.to_array(other))):
                raise ExportError(f"initializer {name!r} has non-finite values")
        elif init != other:
            raise ExportError(f"initializer {name!r} (not the head's) changed")


def validate(model, head: Head, W: np.ndarray, b: np.ndarray, X_probe: np.ndarray,
             base=None, atol: float | None = None, rtol: float = 1e-4,
             threads: int = 1) -> dict[str, Any]:
    """Load ``model`` in ONNX Runtime; on ``X_probe`` its class scores must match
    numpy's from the features it computes (and, with ``base``, those features must
    match the base model's). Returns the figures; raises :class:`ExportError`."""
    from .features import FeatureExtractor

    if atol is None:
        atol = 1e-2 if head.dtype == "float16" else 1e-4
    try:
        F, S = FeatureExtractor(model, head, threads, with_scores=True)(X_probe)
    except Exception as err:  # noqa: BLE001 - any ORT load/run failure is the answer
        raise ExportError(f"ONNX Runtime cannot run the exported model: {err}") from err
    w, bias = _stored(head, W, b)  # the values as the graph holds them
    W_eff = (w.T if head.trans_b else w).astype(np.float64) * head.alpha
    b_eff = (np.zeros(head.n_classes) if bias is None
             else bias.astype(np.float64).reshape(-1) * head.beta)
    ref = head_scores(F, W_eff, b_eff, head.activation)
    diff = np.abs(S.astype(np.float64) - ref)
    report: dict[str, Any] = {
        "probe_n": int(len(X_probe)),
        "max_abs_diff": float(diff.max(initial=0.0)),
        "argmax_agree": float((S.argmax(axis=1) == ref.argmax(axis=1)).mean())
        if len(S) else 1.0,
    }
    if np.any(diff > atol + rtol * np.abs(ref)):
        raise ExportError(f"the exported model's {head.output!r} differs from numpy's "
                          f"prediction by up to {report['max_abs_diff']:.3g}")
    if base is not None:
        F0 = FeatureExtractor(base, head, threads)(X_probe)
        report["feature_max_abs_diff"] = float(np.abs(F0 - F).max(initial=0.0))
        if report["feature_max_abs_diff"] > atol:
            raise ExportError("the exported model's features differ from the base model's")
    return report


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_head(base_model, head: Head, W: np.ndarray, b: np.ndarray, out_path: Path,
                X_probe: np.ndarray | None = None, threads: int = 1) -> dict[str, Any]:
    """Write the base model with the new head to ``out_path`` (atomically), after
    checking the graph is otherwise unchanged and, with a probe batch, that ORT
    loads it and agrees with numpy. Returns the validation figures."""
    base = load_model(base_model)
    new = write_head(base, head, W, b)
    check_same_graph(base, new, head)
    data = new.SerializeToString()
    report: dict[str, Any] = {"bytes": len(data)}
    if X_probe is not None and len(X_probe):
        report.update(validate(data, head, W, b, X_probe, base=base, threads=threads))
    _atomic_write(Path(out_path), data)
    return report
