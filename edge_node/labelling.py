"""Labelling on site: a technician confirms or corrects what the model said.

:class:`Labeller` validates a label against the app's classes, refuses a label
that contradicts an earlier one unless told to overwrite (409, naming who gave
the first and when), records who labelled what, and sends the label to the
cloud as a durable ``sample_labelled`` event (unless the app's upload level is
``none``). The labelling queue is the unlabelled samples, most useful first.

The label and its event are two commits (the store's and the outbox's): the label
is stored as not yet sent (``label_sent`` NULL) and marked once its event is in
the outbox, so a label whose agent died in between is sent at the next start or
when the technician gives the same label again -- never lost.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.manifest import load_manifest

logger = logging.getLogger(__name__)


class LabelError(Exception):
    def __init__(self, status: int, reason: str, detail: Any) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def public(row: dict) -> dict:
    """A sample row as the API shows it (JSON fields decoded, no local path)."""
    out = {k: v for k, v in row.items() if k not in ("input_path", "scores")}
    out["prediction"] = json.loads(row["prediction"]) if row.get("prediction") else None
    scores = json.loads(row["scores"]) if row.get("scores") else []
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:5]
    out["top"] = [{"index": i, "score": scores[i]} for i in order]
    out["heldout"] = bool(row.get("heldout"))
    out["input_url"] = f"/api/v1/samples/{row['sample_id']}/input"
    return out


class Labeller:
    """On construction (the agent's start), labels committed but never handed to the
    outbox -- the agent died between the two -- are sent (:meth:`send_unsent`)."""

    def __init__(self, store, registry, capture, emit_event) -> None:
        self.store = store
        self.registry = registry
        self.capture = capture
        self.emit_event = emit_event
        self.send_unsent()

    def send_unsent(self) -> int:
        """Send every label the node has and never queued; how many."""
        n = 0
        for row in self.store.unsent_labels():
            try:
                self._send(row, previous=None)
                n += 1
            except Exception:  # noqa: BLE001 - never stop the node starting; tried next start
                logger.exception("label of sample %s not sent", row["sample_id"])
        if n:
            logger.info("sent %d labels given before the last stop and never queued", n)
        return n

    def _send(self, row: dict, previous: str | None) -> None:
        """The label's ``sample_labelled`` event into the outbox, then marked sent. Its
        msg_id comes from the sample and the label's time: sent again after a crash
        in between, it is kept once by the outbox and by the cloud."""
        if self.capture.upload_level(row["app"]) != "none":
            mid = uuid.uuid5(uuid.NAMESPACE_URL, f"aidc:sample_labelled:{row['sample_id']}:"
                             f"{row['labelled_at']!r}").hex
            if self.emit_event("sample_labelled", app=row["app"], data={
                    "sample_id": row["sample_id"], "label": row["label"],
                    "by": row["labelled_by"], "labelled_at": row["labelled_at"],
                    "source": row["label_source"], "previous": previous},
                    msg_id=mid) is False:
                return  # the outbox refused it: sent at the next start or retry
        self.store.mark_label_sent(row["sample_id"])

    def classes(self, app: str, n_scores: int) -> list[str]:
        """The app's labels: from the served app, else an installed version, else
        the class indices as strings."""
        served = self.registry.get(app)
        if served is not None and served.labels:
            return list(served.labels)
        for inst in self.store.all_installed():
            if inst["name"] != app:
                continue
            try:
                d = Path(inst["app_dir"])
                m = load_manifest(json.loads((d / "manifest.json").read_text()))
                lf = m.postprocess.labels_file if m.postprocess else None
                if lf and (d / lf).exists():
                    return [ln.strip() for ln in (d / lf).read_text().splitlines() if ln.strip()]
            except (OSError, ValueError):
                continue
        return [str(i) for i in range(n_scores)]

    def get(self, sample_id: str) -> dict:
        row = self.store.get_sample(sample_id)
        if row is None:
            raise LabelError(404, "unknown_sample", f"no sample {sample_id!r}")
        return row

    def label(self, sample_id: str, label: object, by: str | None = None,
              overwrite: bool = False, source: str = "technician") -> dict:
        """Set a sample's label; the updated row. :class:`LabelError` says why not."""
        row = self.get(sample_id)
        if not isinstance(label, str) or not label.strip():
            raise LabelError(400, "bad_label", "label must be a non-empty string")
        label = label.strip()
        if by is not None and (not isinstance(by, str) or len(by) > 64):
            raise LabelError(400, "bad_label", "by must be a string of at most 64 characters")
        n_scores = len(json.loads(row["scores"])) if row.get("scores") else 0
        classes = self.classes(row["app"], n_scores)
        if label not in classes:
            raise LabelError(400, "unknown_label",
                             {"label": label, "classes": classes[:1000],
                              "hint": f"{row['app']} knows {len(classes)} classes"})
        if row["label"] is not None and row["label"] != label and not overwrite:
            raise LabelError(409, "label_conflict", {
                "label": row["label"], "labelled_by": row.get("labelled_by"),
                "labelled_at": row.get("labelled_at"),
                "hint": "send overwrite: true to replace it"})
        if row["label"] == label and row.get("labelled_by") == by:
            # the same answer again: nothing changes; sent only if it never was (the
            # agent died between the label's commit and its event's)
            if row.get("label_sent") is None:
                self._send(row, previous=None)
                row = self.store.get_sample(sample_id)
            return row
        previous = row["label"]
        self.store.set_label(sample_id, label, by, source)
        row = self.store.get_sample(sample_id)
        self.capture.stats["samples_labelled"] += 1
        self._send(row, previous)
        return self.store.get_sample(sample_id)

    def input(self, sample_id: str, as_png: bool = False) -> tuple[bytes, str]:
        """The sample's stored input and its content type; a tensor that looks like
        an image (2-D, or 1-D of a square size) can be rendered as a PNG preview."""
        row = self.get(sample_id)
        try:
            data = Path(row["input_path"]).read_bytes()
        except OSError as err:
            raise LabelError(410, "input_missing", f"the input of {sample_id!r} is gone: "
                             f"{err.strerror}") from err
        ctype = {"tensor/npy": "application/x-npy"}.get(row["input_type"], row["input_type"])
        if not as_png or row["input_type"] != "tensor/npy":
            return data, ctype
        return tensor_png(np.load(io.BytesIO(data), allow_pickle=False)), "image/png"


def tensor_png(arr: np.ndarray, size: int = 160) -> bytes:
    """A gray PNG preview of a tensor that is an image (HxW, 1xHxW, or H*W flat)."""
    import cv2

    a = np.asarray(arr, np.float32).squeeze()
    if a.ndim == 1:
        side = int(round(a.size ** 0.5))
        if side * side != a.size:
            raise LabelError(415, "no_preview", f"a tensor of {a.size} values is not an image")
        a = a.reshape(side, side)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.mean(axis=0)
    if a.ndim != 2:
        raise LabelError(415, "no_preview", f"a tensor of shape {list(arr.shape)} is not an image")
    lo, hi = float(a.min()), float(a.max())
    img = ((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)
    scale = max(1, size // max(img.shape))
    img = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale),
                     interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", img)
    return png.tobytes()
