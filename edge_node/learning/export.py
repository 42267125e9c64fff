"""Write trained layers back into a copy of the model, and check the result.

The copy differs from the base model only in the trained layers' initializers
(same names, shapes, dtypes and storage orientation; Gemm ``alpha``/``beta``
undone); every node, input, output, opset and other initializer is kept, which
:func:`check_same_graph` verifies. :func:`validate_layers` then loads the new
file in ONNX Runtime and checks, on a probe batch of real inputs, that its
class scores equal numpy's forward pass (``softmax(features @ W + b)`` for the
head alone; through the hidden layer and its activation first when that was
trained too) from the first trained layer's input as that same model computes
it, and that this input equals the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .head import Head, load_model
from .train import mlp_logits, softmax


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


Layers = Sequence[tuple[Head, np.ndarray, np.ndarray]]


def write_layers(model, layers: Layers):
    """A copy of ``model`` (path, bytes or ModelProto) with each ``(layer, W, b)``'s
    weights replaced (``layer`` from :func:`.head.find_head` / :func:`.head.find_body`)."""
    from onnx import numpy_helper

    base = load_model(model)
    new = type(base)()
    new.CopyFrom(base)
    values: dict[str, np.ndarray] = {}
    for layer, W, b in layers:
        w, bias = _stored(layer, W, b)
        values[layer.weight] = w
        if layer.bias is not None:
            values[layer.bias] = bias
    for init in new.graph.initializer:
        if init.name in values:
            value = values[init.name].reshape(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
    return new


def write_head(model, head: Head, W: np.ndarray, b: np.ndarray):
    """A copy of ``model`` (path, bytes or ModelProto) with the head's weights replaced."""
    return write_layers(model, [(head, W, b)])


def _as_layers(layers: Head | Sequence[Head]) -> list[Head]:
    return [layers] if isinstance(layers, Head) else list(layers)


def check_same_graph(base, new, layers: Head | Sequence[Head]) -> None:
    """Everything but the trained layers' initializer values is identical; their
    shapes and dtypes too. ``layers``: the head, or every layer trained."""
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
    trained = {n for layer in _as_layers(layers) for n in (layer.weight, layer.bias)}
    for name, init in ia.items():
        other = ib[name]
        if name in trained:
            if (list(init.dims), init.data_type) != (list(other.dims), other.data_type):
                raise ExportError(f"initializer {name!r} changed shape or dtype")
            if not np.all(np.isfinite(numpy_helper.to_array(other))):
                raise ExportError(f"initializer {name!r} has non-finite values")
        elif init != other:
            raise ExportError(f"initializer {name!r} (not a trained layer's) changed")


def _effective(layer: Head, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) as the graph computes with them once stored (dtype rounding included)."""
    w, bias = _stored(layer, W, b)
    W_eff = (w.T if layer.trans_b else w).astype(np.float64) * layer.alpha
    b_eff = (np.zeros(layer.n_classes) if bias is None
             else bias.astype(np.float64).reshape(-1) * layer.beta)
    return W_eff, b_eff


def validate_layers(model, layers: Layers, X_probe: np.ndarray, base=None,
                    atol: float | None = None, rtol: float = 1e-4,
                    threads: int = 1) -> dict[str, Any]:
    """Load ``model`` in ONNX Runtime; on ``X_probe`` its class scores must match
    numpy's forward pass through ``layers`` (first layer first, the head last)
    from the first layer's input as that model computes it (and, with ``base``,
    that input must match the base model's). Returns the figures; raises
    :class:`ExportError`."""
    from .features import FeatureExtractor

    layers = list(layers)
    first, head = layers[0][0], layers[-1][0]
    if atol is None:
        atol = 1e-2 if head.dtype == "float16" else 1e-4
    try:
        F, S = FeatureExtractor(model, first, threads, with_scores=True,
                                scores=head)(X_probe)
    except Exception as err:  # noqa: BLE001 - any ORT load/run failure is the answer
        raise ExportError(f"ONNX Runtime cannot run the exported model: {err}") from err
    params = [_effective(layer, W, b) for layer, W, b in layers]
    logits = mlp_logits(F, params, first.activation) if len(params) > 1 else \
        np.asarray(F, np.float64) @ params[0][0] + params[0][1]
    ref = softmax(logits) if head.activation == "softmax" else logits
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
        F0 = FeatureExtractor(base, first, threads)(X_probe)
        report["feature_max_abs_diff"] = float(np.abs(F0 - F).max(initial=0.0))
        if report["feature_max_abs_diff"] > atol:
            raise ExportError("the exported model's features differ from the base model's")
    return report


def validate(model, head: Head, W: np.ndarray, b: np.ndarray, X_probe: np.ndarray,
             base=None, atol: float | None = None, rtol: float = 1e-4,
             threads: int = 1) -> dict[str, Any]:
    """:func:`validate_layers` for the head alone."""
    return validate_layers(model, [(head, W, b)], X_probe, base, atol, rtol, threads)


def _atomic_write(path: Path, data: bytes) -> None:
    from cloud_sync.atomic import write_atomic

    write_atomic(path, data)


def export_layers(base_model, layers: Layers, out_path: Path,
                  X_probe: np.ndarray | None = None, threads: int = 1) -> dict[str, Any]:
    """Write the base model with the trained ``layers`` (``(layer, W, b)``, first
    layer first) to ``out_path`` (atomically), after checking the graph is
    otherwise unchanged and, with a probe batch, that ORT loads it and agrees with
    numpy. Returns the validation figures."""
    base = load_model(base_model)
    new = write_layers(base, layers)
    check_same_graph(base, new, [layer for layer, _, _ in layers])
    data = new.SerializeToString()
    report: dict[str, Any] = {"bytes": len(data)}
    if X_probe is not None and len(X_probe):
        report.update(validate_layers(data, layers, X_probe, base=base, threads=threads))
    _atomic_write(Path(out_path), data)
    return report


def export_head(base_model, head: Head, W: np.ndarray, b: np.ndarray, out_path: Path,
                X_probe: np.ndarray | None = None, threads: int = 1) -> dict[str, Any]:
    """:func:`export_layers` for the head alone."""
    return export_layers(base_model, [(head, W, b)], out_path, X_probe, threads)
