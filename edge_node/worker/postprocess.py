"""Model output -> a classification answer, as the manifest's ``postprocess`` says."""

from __future__ import annotations

import math

import numpy as np

from cloud_sync.manifest import Postprocess


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def classify(scores: np.ndarray, post: Postprocess, labels: list[str] | None) -> dict:
    """The answer for batch item 0 of ``scores`` (shape ``[N, C, ...]`` or ``[C]``).

    Returns ``{"label", "index", "score", "top_k": [{"label", "index", "score"}],
    "scores": [...]}``; ``scores`` are after softmax when ``post.softmax``; a
    label defaults to ``str(index)`` when no (or too short a) labels list is given.
    """
    s = np.asarray(scores)
    if s.ndim == 0 or s.size == 0:
        raise ValueError(f"cannot classify an output of shape {list(s.shape)}")
    s = s.reshape(s.shape[0], -1)[0] if s.ndim > 1 else s
    if s.size <= SMALL:
        return _classify_small(s.tolist(), post, labels)
    s = s.astype(np.float64)
    if post.softmax:
        s = softmax(s)
    k = min(post.top_k, s.size)
    top = np.argpartition(-s, k - 1)[:k] if k < s.size else np.arange(s.size)
    top = top[np.argsort(-s[top], kind="stable")]

    def name(i: int) -> str:
        return labels[i] if labels is not None and i < len(labels) else str(i)

    top_k = [{"label": name(int(i)), "index": int(i), "score": float(s[i])} for i in top]
    best = top_k[0]
    return {"label": best["label"], "index": best["index"], "score": best["score"],
            "top_k": top_k, "scores": s.tolist()}


SMALL = 64  # up to this many classes, plain Python beats numpy's per-call overhead


def _classify_small(s: list, post: Postprocess, labels: list[str] | None) -> dict:
    s = [float(v) for v in s]
    if post.softmax:
        m = max(s)
        e = [math.exp(v - m) for v in s]
        total = sum(e)
        s = [v / total for v in e]
    order = sorted(range(len(s)), key=lambda i: -s[i])[:min(post.top_k, len(s))]
    n = len(labels) if labels is not None else 0
    top_k = [{"label": labels[i] if i < n else str(i), "index": i, "score": s[i]}
             for i in order]
    best = top_k[0]
    return {"label": best["label"], "index": best["index"], "score": best["score"],
            "top_k": top_k, "scores": s}
