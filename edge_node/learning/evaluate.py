"""Accuracy of a model file on labelled inputs, by ONNX Runtime.

For the promotion gate: the same inputs through the base and the candidate
model give comparable figures. Only ONNX Runtime and numpy are imported (no
``onnx``), so the gate stays light.

``X`` is the model's input batch (what the worker feeds after preprocessing)
and ``y`` the class indices; the prediction is the argmax of the class-score
output (``output``, else the manifest's ``postprocess.output``, else the first
floating-point output of rank 2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
           "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


@dataclass
class Evaluation:
    n: int
    accuracy: float | None
    #: one row per class: {"class": i, "n": ..., "correct": ..., "accuracy": ... or None}
    per_class: list[dict[str, Any]]
    #: confusion[true][predicted]
    confusion: list[list[int]]
    output: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _pick_output(session, output: str | None, manifest: Any) -> str:
    names = [o.name for o in session.get_outputs()]
    if output is None and manifest is not None:
        m = manifest.model_dump() if hasattr(manifest, "model_dump") else manifest
        output = ((m or {}).get("postprocess") or {}).get("output")
    if output is not None:
        if output not in names:
            raise ValueError(f"{output!r} is not an output of the model ({', '.join(names)})")
        return output
    for o in session.get_outputs():
        if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)") and \
                len(o.shape or []) == 2:
            return o.name
    raise ValueError("no class-score output (float, rank 2); name it with output=")


def _predict(model, X, output, manifest, batch_size, threads) -> tuple[np.ndarray, str]:
    sess = _session(model, threads)
    out = _pick_output(sess, output, manifest)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"the model has {len(inputs)} inputs; evaluation needs one")
    name, dtype = inputs[0].name, _DTYPES.get(inputs[0].type, np.float32)
    X = np.asarray(X)
    parts = [np.asarray(sess.run([out], {name: np.ascontiguousarray(X[i:i + batch_size],
                                                                    dtype=dtype)})[0])
             for i in range(0, len(X), batch_size)]
    return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), out


def predict_scores(model, X: np.ndarray, output: str | None = None, manifest: Any = None,
                   batch_size: int = 512, threads: int = 1) -> np.ndarray:
    """Class scores (n, n_classes) of ``model`` (path or bytes) on inputs ``X``."""
    return _predict(model, X, output, manifest, batch_size, threads)[0]


def score(y: np.ndarray, predicted: np.ndarray, output: str = "",
          n_classes: int | None = None) -> Evaluation:
    """Accuracy, per-class accuracy and the confusion matrix of predictions."""
    y = np.asarray(y).astype(np.int64).reshape(-1)
    predicted = np.asarray(predicted).astype(np.int64).reshape(-1)
    if len(y) != len(predicted):
        raise ValueError(f"{len(y)} labels for {len(predicted)} predictions")
    k = int(n_classes or (max(int(y.max(initial=-1)), int(predicted.max(initial=-1))) + 1))
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (y, predicted), 1)
    per_class = []
    for c in range(k):
        n, correct = int(confusion[c].sum()), int(confusion[c, c])
        per_class.append({"class": c, "n": n, "correct": correct,
                          "accuracy": correct / n if n else None})
    acc = float((y == predicted).mean()) if len(y) else None
    return Evaluation(n=int(len(y)), accuracy=acc, per_class=per_class,
                      confusion=confusion.tolist(), output=output)


def evaluate(model, X: np.ndarray, y: np.ndarray, output: str | None = None,
             manifest: Any = None, n_classes: int | None = None, batch_size: int = 512,
             threads: int = 1) -> Evaluation:
    """Accuracy of ``model`` (a path or bytes) on inputs ``X`` with class indices ``y``."""
    scores, output = _predict(model, X, output, manifest, batch_size, threads)
    if n_classes is None and scores.ndim == 2:
        n_classes = scores.shape[1]
    return score(y, scores.argmax(axis=1) if len(scores) else np.zeros(0, np.int64),
                 output, n_classes)


def evaluate_app(app_dir: Path, X: np.ndarray, y: np.ndarray, model: Path | None = None,
                 **kw: Any) -> Evaluation:
    """:func:`evaluate` with the app dir's manifest; ``model`` replaces its model file
    (a candidate judged with the base app's manifest)."""
    app_dir = Path(app_dir)
    manifest = json.loads((app_dir / "manifest.json").read_text())
    path = model or app_dir / ((manifest.get("model") or {}).get("file") or "model.onnx")
    return evaluate(path, X, y, manifest=manifest, **kw)
