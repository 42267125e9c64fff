"""Results and hard examples, off the request path.

The serving layer calls :meth:`Capture.on_result` for every classification
result. That only enqueues (bounded; when full the result is dropped and
*counted*). A background thread then, in order:

1. writes results to SQLite in batches;
2. keeps a hard example when the app's policy says so (edge_node/hardex.py:
   confidence, margin, entropy, box), within a per-app rate limit and the
   node's disk quota (both counted; past the quota the oldest unlabelled samples
   are evicted), by writing the input to ``<data_dir>/samples`` and a
   ``samples`` row with its usefulness (the labelling queue's order) and
   whether it is kept apart (held out) for judging fine-tuned models, and then
3. puts a :class:`~cloud_sync.schemas.FeedbackMessage` into the outbox as far
   as the app's upload level lets it (``full``: with the input; ``features``:
   the head's features instead, :mod:`edge_node.sharing`; ``metadata``:
   without; ``none``: nothing leaves), whose msg_id is the sample id, so a
   retry is deduplicated by the cloud.

A camera stream's result comes with its frame (``frame``, a callable that copies
the pixels out of the stream's shared-memory ring): only when the result is hard
and the app's rate limit has room is it called, and the frame is kept as a PNG
(:func:`~edge_node.streams.snapshot.frame_png`, an ordinary ``image/png``
sample); a frame overwritten meanwhile is counted (``samples_frame_gone``) and
nothing is kept.

On start, samples that never reached the outbox (a crash between steps 2 and 3)
are put there again: nothing is lost.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync import schemas
from cloud_sync.errors import CloudSyncError

from .config import UPLOAD_LEVELS, FeedbackConfig
from .hardex import Policy, judge
from .sharing import FeatureSharing, FeaturesUnavailable
from .store import NodeStore

logger = logging.getLogger(__name__)

#: the largest encoded input we upload inside one feedback message
MAX_UPLOAD_INPUT = 700 * 1024
#: more scores than this and only the top ones travel (a 21k-class model)
MAX_UPLOAD_SCORES = 1000
#: results are written to SQLite at most this long after they happen
GATHER_S = 0.2


@dataclass
class Observation:
    app: str
    version: str
    reason: str | None  # None: not a hard example
    usefulness: float
    result: dict
    tensor: np.ndarray | None
    image: bytes | None
    source: str
    ts: float
    #: a camera frame's pixels (BGR or grey uint8), kept as a PNG
    pixels: np.ndarray | None = None


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Kept apart for judging? Decided once, from the id: the same on every restart."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


class RateLimit:
    """Token bucket: ``per_minute`` events, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def available(self) -> bool:
        """Whether :meth:`allow` would say yes now (takes nothing; any thread)."""
        return self.tokens + (time.monotonic() - self.last) * self.rate >= 1.0


def encode_input(tensor: np.ndarray | None, image: bytes | None,
                 pixels: np.ndarray | None = None) -> tuple[str, bytes]:
    """The input as (type, bytes): a camera frame's pixels as a PNG, the image as
    sent when it is PNG or JPEG, other image formats as PNG, else the tensor as .npy."""
    if pixels is not None:
        from .streams.snapshot import frame_png

        return "image/png", frame_png(pixels)
    if image is not None:
        if image.startswith(b"\x89PNG\r\n\x1a\n"):
            return "image/png", image
        if image.startswith(b"\xff\xd8\xff"):
            return "image/jpeg", image
        import cv2  # only for the odd format: keeps OpenCV out of the agent's memory

        arr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None:
            ok, png = cv2.imencode(".png", arr)
            if ok:
                return "image/png", png.tobytes()
    buf = io.BytesIO()
    np.save(buf, np.asarray(tensor), allow_pickle=False)
    return "tensor/npy", buf.getvalue()


class Capture:
    def __init__(self, store: NodeStore, outbox: Any, feedback_topic: str,
                 samples_dir: Path, cfg: FeedbackConfig, maxsize: int = 10000) -> None:
        self.store = store
        self.outbox = outbox
        self.topic = feedback_topic
        self.dir = samples_dir
        self.cfg = cfg
        self.stats: Counter[str] = Counter()
        self._q: queue.Queue[Observation | None] = queue.Queue(maxsize)
        self._limits: dict[str, RateLimit] = {}
        self._keeping = threading.Lock()  # the capture thread and the alarms API both keep
        self._thread: threading.Thread | None = None
        #: app -> upload level the cloud asks for (the desired state); the site's
        #: own config can only make it stricter
        self.cloud_upload: dict[str, str] = {}
        #: level ``features``: computes a sample's features (its model_dir is set by the agent)
        self.features = FeatureSharing()
        self._share_q: queue.Queue[tuple[dict, bytes] | None] = queue.Queue(maxsize)
        self._share_lock = threading.Lock()
        self._share_thread: threading.Thread | None = None
        self._fallback_logged: set[tuple[str, str, str]] = set()

    # -- called on the request path: never blocks -----------------------
    def on_result(self, app: str, version: str, policy: Policy | None, result: dict,
                  tensor: np.ndarray | None, image: bytes | None, source: str = "api",
                  frame: Callable[[], np.ndarray | None] | None = None) -> None:
        """``policy``: the app's hard-example policy (:func:`edge_node.hardex.resolve`);
        ``frame``: a camera frame's pixels on demand (None when overwritten meanwhile),
        called only for a hard result the rate limit has room for."""
        reason, usefulness = None, 0.0
        if self.cfg.enabled and policy is not None:
            try:
                hard, usefulness, why = judge(policy, result)
            except ValueError:
                hard, why = False, ""
                self.stats["policy_errors"] += 1
            if hard:
                reason = why
        pixels = None
        if reason is not None and frame is not None and tensor is None and image is None:
            pixels = self._frame(app, frame)
            if pixels is None:
                reason = None
        if reason is None:
            tensor = image = None  # not a candidate: keep only the result, not its input
        try:
            self._q.put_nowait(Observation(app, version, reason, usefulness, result, tensor,
                                           image, source, time.time(), pixels))
        except queue.Full:
            self.stats["observations_dropped"] += 1

    def _frame(self, app: str, frame: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """A hard frame's pixels, copied only when the app's rate limit has room (a
        camera at 30 fps must not copy frames the limit throws away)."""
        if not self._limits.setdefault(app, RateLimit(self.cfg.max_per_minute)).available():
            self.stats["samples_rate_limited"] += 1
            return None
        pixels = frame()
        if pixels is None:  # the capture process reused the slot meanwhile
            self.stats["samples_frame_gone"] += 1
        return pixels

    def upload_level(self, app: str) -> str:
        """What of ``app``'s samples may leave: the stricter of the site's config
        and the cloud's setting (:attr:`cloud_upload`)."""
        site = (self.cfg.apps.get(app).upload if app in self.cfg.apps else None) \
            or self.cfg.upload
        cloud = self.cloud_upload.get(app)
        levels = [lv for lv in (site, cloud) if lv is not None]
        return min(levels, key=UPLOAD_LEVELS.index)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._requeue_unsent()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self._q.put(None)
            self._thread.join(10)
        with self._share_lock:
            if self._share_thread is not None:
                self._share_q.put(None)
                self._share_thread.join(10)
        self.features.close()

    def _run(self) -> None:
        while True:
            first = self._q.get()
            batch = [first]
            # gather for a moment: one SQLite commit per GATHER_S, not one per camera
            # frame (that commit was a third of the agent's CPU with 4 live streams)
            deadline = time.monotonic() + GATHER_S
            while len(batch) < 500 and batch[-1] is not None:
                wait = deadline - time.monotonic()
                try:
                    batch.append(self._q.get(timeout=wait) if wait > 0
                                 else self._q.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            obs = [o for o in batch if o is not None]
            try:
                self._handle(obs)
            except Exception:  # noqa: BLE001 - keep capturing; the reason is logged
                self.stats["capture_errors"] += 1
                logger.exception("capture: failed to record %d results", len(obs))
            if stop:
                return

    def _handle(self, obs: list[Observation]) -> None:
        self.store.add_results([
            {"ts": o.ts, "app": o.app, "version": o.version, "label": o.result.get("label"),
             "score": float(o.result.get("score", 0.0)), "source": o.source}
            for o in obs
        ])
        try:
            for o in obs:
                if o.reason is None or (o.tensor is None and o.image is None
                                        and o.pixels is None):
                    continue  # not a hard example (decided in on_result)
                limit = self._limits.setdefault(o.app, RateLimit(self.cfg.max_per_minute))
                if not limit.allow():
                    self.stats["samples_rate_limited"] += 1
                    continue
                self._keep(o)
        finally:
            # counted once the batch's samples are kept too: results >= n means the
            # first n results are fully handled (their samples counted)
            self.stats["results"] += len(obs)

    def _keep(self, o: Observation, label: str | None = None,
              label_source: str | None = None, by: str | None = None) -> dict | None:
        """Store one sample (within the quota) and queue what may leave; its row."""
        sample_id = uuid.uuid4().hex
        input_type, data = encode_input(o.tensor, o.image, o.pixels)
        with self._keeping:
            return self._store(sample_id, o, input_type, data, label, label_source, by)

    def _store(self, sample_id: str, o: Observation, input_type: str, data: bytes,
               label: str | None, label_source: str | None, by: str | None) -> dict | None:
        if not self._make_room(len(data)):
            self.stats["samples_quota_full"] += 1
            return None
        ext = {"image/png": "png", "image/jpeg": "jpg"}.get(input_type, "npy")
        path = self.dir / f"{sample_id}.{ext}"
        path.write_bytes(data)
        pred = {"label": str(o.result.get("label")), "index": int(o.result.get("index", -1)),
                "score": float(o.result.get("score", 0.0))}
        row = {"sample_id": sample_id, "created_at": o.ts, "app": o.app, "version": o.version,
               "reason": o.reason, "input_type": input_type, "input_path": str(path),
               "prediction": json.dumps(pred),
               "scores": json.dumps([float(s) for s in o.result.get("scores", [])]),
               "label": label, "source": o.source, "msg_id": sample_id,
               "usefulness": float(o.usefulness), "nbytes": len(data),
               "heldout": int(is_heldout(sample_id, self.cfg.heldout_fraction)),
               "labelled_at": time.time() if label is not None else None,
               "labelled_by": by if label is not None else None,
               "label_source": label_source}
        self.store.add_sample(row)
        self.stats["samples_kept"] += 1
        self._enqueue(row, data)
        return row

    def _make_room(self, nbytes: int) -> bool:
        """Evict the oldest unlabelled samples until ``nbytes`` more fit the quota;
        False when it cannot (only labelled samples are left)."""
        max_bytes = self.cfg.max_disk_mb * 1024 * 1024
        count, used = self.store.sample_usage()
        while count + 1 > self.cfg.max_samples or used + nbytes > max_bytes:
            victims = self.store.oldest_unlabelled(limit=50)
            if not victims:
                return False
            for v in victims:
                Path(v["input_path"]).unlink(missing_ok=True)
                self.store.delete_sample(v["sample_id"])
                self.stats["samples_evicted"] += 1
                count, used = count - 1, used - (v["nbytes"] or 0)
                if count + 1 <= self.cfg.max_samples and used + nbytes <= max_bytes:
                    break
        return True

    def _message(self, row: dict, data: bytes, shared: str,
                 features: dict | None = None) -> bytes:
        scores = json.loads(row["scores"])
        if len(scores) > MAX_UPLOAD_SCORES:  # only the top ones travel
            keep = set(np.argsort(scores)[-MAX_UPLOAD_SCORES:].tolist())
            scores = [s if i in keep else 0.0 for i, s in enumerate(scores)][:10000]
        sample = schemas.FeedbackSample(
            sample_id=row["sample_id"], app=row["app"], version=row["version"],
            created_at=row["created_at"], reason=row["reason"],
            input_type=row["input_type"] if shared == "full" else "none",
            input_b64=base64.b64encode(data).decode() if shared == "full" else "",
            prediction=schemas.Prediction(**json.loads(row["prediction"])),
            scores=scores, label=row["label"], source=row["source"], shared=shared,
            usefulness=min(1.0, max(0.0, float(row.get("usefulness") or 0.0))),
            heldout=bool(row.get("heldout")),
            features=schemas.SampleFeatures(**features) if shared == "features" else None,
        )
        payload = schemas.FeedbackMessage(msg_id=row["msg_id"], sample=sample).to_bytes()
        if len(payload) > schemas.MAX_MESSAGE_BYTES:
            raise ValueError(f"message of {len(payload)} bytes")
        return payload

    def _enqueue(self, row: dict, data: bytes) -> None:
        """Put one stored sample into the outbox; a sample that cannot travel
        stays local, marked and counted, so it is never retried at every boot."""
        sid = row["sample_id"]
        shared = self.upload_level(row["app"])
        if shared == "none":  # the site keeps everything home: counted, never sent
            self.stats["samples_kept_home"] += 1
            self.store.set_shared(sid, "none")
            self.store.mark_queued(sid)
            return
        if shared == "features":  # the input stays home; its features travel (computed
            self._share(row, data)  # on their own thread: results never wait for them)
            return
        self._put(row, data, shared)

    def _put(self, row: dict, data: bytes, shared: str, features: dict | None = None) -> None:
        sid = row["sample_id"]
        if shared == "full" and len(data) > MAX_UPLOAD_INPUT:
            self.stats["samples_too_large_to_upload"] += 1
            logger.warning("sample %s: input of %d bytes kept locally, too large to upload",
                           sid, len(data))
            self.store.mark_queued(sid)
            return
        try:
            payload = self._message(row, data, shared, features)
        except ValueError as err:  # pydantic ValidationError is a ValueError
            self.stats["samples_unuploadable"] += 1
            logger.warning("sample %s kept locally, cannot be uploaded: %s", sid, err)
            self.store.mark_queued(sid)
            return
        try:
            if self.outbox.put(self.topic, payload, row["msg_id"], kind="feedback"):
                self.stats["samples_queued"] += 1
                self.stats[f"samples_shared_{shared}"] += 1
            self.store.set_shared(sid, shared)
            self.store.mark_queued(sid)
        except CloudSyncError as err:  # outbox full: kept locally, counted, retried on start
            self.stats["samples_outbox_full"] += 1
            logger.warning("sample %s kept locally, not queued: %s", sid, err)

    def _share(self, row: dict, data: bytes) -> None:
        """Queue a sample for the features thread (started on first use). The
        sample stays unqueued in SQLite until then: a stop or crash meanwhile
        loses nothing (it is requeued on start)."""
        with self._share_lock:
            if self._share_thread is None or not self._share_thread.is_alive():
                self._share_thread = threading.Thread(target=self._share_run,
                                                      name="capture-features", daemon=True)
                self._share_thread.start()
        try:
            self._share_q.put_nowait((row, data))
        except queue.Full:
            self.stats["samples_features_backlog"] += 1  # queued at the next start

    def _share_run(self) -> None:
        while True:
            item = self._share_q.get()
            if item is None:
                return
            row, data = item
            try:
                if not Path(row["input_path"]).exists():  # evicted meanwhile
                    self.stats["samples_evicted_before_upload"] += 1
                    continue
                try:
                    features = self.features.features(row["app"], row["version"],
                                                      row["input_type"], row["input_path"])
                    shared = "features"
                except FeaturesUnavailable as err:
                    features, shared = None, self._features_fallback(row, err)
                self._put(row, data, shared, features)
            except Exception:  # noqa: BLE001 - the next sample still goes; this one is requeued
                self.stats["capture_errors"] += 1
                logger.exception("sample %s: sharing its features failed", row["sample_id"])

    def _features_fallback(self, row: dict, err: FeaturesUnavailable) -> str:
        """No features for this sample: it travels as ``metadata``, counted; the
        reason is logged (a warning once per app, version and kind; then debug)."""
        self.stats["samples_features_fallback"] += 1
        self.stats[f"samples_features_fallback_{err.kind}"] += 1
        key = (row["app"], row["version"], err.kind)
        level = logging.DEBUG if key in self._fallback_logged else logging.WARNING
        self._fallback_logged.add(key)
        logger.log(level, "sample %s of %s %s shared as metadata, no features: %s",
                   row["sample_id"], row["app"], row["version"], err)
        return "metadata"

    def _requeue_unsent(self) -> None:
        """Samples written but never queued (a crash in between, a full outbox):
        queue them now. Each one is tried on its own; one bad row stops nothing."""
        for row in self.store.unqueued_samples():
            try:
                data = Path(row["input_path"]).read_bytes()
            except OSError:
                self.stats["samples_input_missing"] += 1
                self.store.mark_queued(row["sample_id"])
                continue
            try:
                self._enqueue(row, data)
                self.stats["samples_requeued"] += 1
            except Exception:  # noqa: BLE001 - never let one sample stop the node starting
                self.stats["capture_errors"] += 1
                logger.exception("could not requeue sample %s", row["sample_id"])
