"""Hard-example policies: is this result worth a technician's look, and how much?

A policy looks at one classification result (its score vector) or one detection
result (its boxes) and answers ``(hard, usefulness, reason)``. ``usefulness``
(0..1, higher first) orders the labelling queue, so the most informative
samples are labelled first.

| policy       | hard when                                   | usefulness                  |
|--------------|---------------------------------------------|-----------------------------|
| `confidence` | top-1 score < threshold                     | 1 - top-1                   |
| `margin`     | top-1 - top-2 < threshold                   | 1 - (top-1 - top-2)         |
| `entropy`    | entropy / log(classes) > threshold          | that normalised entropy     |
| `box`        | a box's score is in [box_low, threshold)    | 1 - distance to the middle  |
| `none`       | never                                       | -                           |

The manifest's ``learning.hard_examples`` gives an app's default; the node's
config (``feedback.apps.<app>``, ``feedback.threshold``) overrides it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Policy:
    kind: str = "confidence"  # confidence | margin | entropy | box | none
    threshold: float = 0.6
    box_low: float = 0.3

    def describe(self) -> str:
        if self.kind == "box":
            return f"box score in [{self.box_low:g}, {self.threshold:g})"
        sym = ">" if self.kind == "entropy" else "<"
        return f"{self.kind}{sym}{self.threshold:g}"


def resolve(manifest_policy: Any, override: dict | None = None,
            global_threshold: float | None = None) -> Policy:
    """The app's policy: the manifest's, then the node's per-app override, then
    the node-wide threshold (kept for compatibility: it sets the threshold only)."""
    kind = getattr(manifest_policy, "policy", "confidence")
    threshold = float(getattr(manifest_policy, "threshold", 0.6))
    box_low = float(getattr(manifest_policy, "box_low", 0.3) or 0.3)
    if global_threshold is not None:
        threshold = global_threshold
    o = override or {}
    kind = o.get("policy", kind)
    threshold = float(o.get("threshold", threshold))
    box_low = float(o.get("box_low", box_low))
    return Policy(kind, threshold, box_low)


def _top2(scores: Sequence[float]) -> tuple[float, float]:
    a = b = -math.inf
    for s in scores:
        if s > a:
            a, b = s, a
        elif s > b:
            b = s
    return a, (b if b != -math.inf else 0.0)


def judge(policy: Policy, result: dict) -> tuple[bool, float, str]:
    """``(hard, usefulness, reason)`` for one result (``scores`` or ``detections``)."""
    kind, t = policy.kind, policy.threshold
    if kind == "none":
        return False, 0.0, ""
    if kind == "box":
        boxes = result.get("detections") or []
        best = 0.0
        for b in boxes:
            s = float(b.get("score", 0.0))
            if policy.box_low <= s < t:
                mid = (policy.box_low + t) / 2
                half = max((t - policy.box_low) / 2, 1e-9)
                best = max(best, 1.0 - abs(s - mid) / half)
        return (best > 0.0, best, policy.describe()) if boxes else (False, 0.0, "")
    scores = result.get("scores")
    if not scores:  # no score vector: fall back to the answer's score
        top1 = float(result.get("score", 1.0))
        return (top1 < t, 1.0 - top1, policy.describe()) if kind == "confidence" else \
            (False, 0.0, "")
    if kind == "confidence":
        top1 = max(scores)
        return top1 < t, min(1.0, max(0.0, 1.0 - top1)), policy.describe()
    if kind == "margin":
        a, b = _top2(scores)
        margin = a - b
        return margin < t, min(1.0, max(0.0, 1.0 - margin)), policy.describe()
    if kind == "entropy":
        total = sum(s for s in scores if s > 0)
        if total <= 0 or len(scores) < 2:
            return False, 0.0, ""
        h = -sum((s / total) * math.log(s / total) for s in scores if s > 0)
        norm = h / math.log(len(scores))
        return norm > t, min(1.0, norm), policy.describe()
    raise ValueError(f"unknown hard-example policy {kind!r}")
