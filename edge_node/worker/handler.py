"""What a worker does with one request dict; never raises, always answers.

Requests: ``{"op": "ping"}``, ``{"op": "meta"}``,
``{"op": "infer", "inputs": {name: ndarray}, "outputs": [names] | None}``,
``{"op": "classify", "image": bytes}``, and for camera streams
``{"op": "classify_frame", "ring", "owner", "gen", "slot", "seq", "shape", "dtype",
"keep_scores"}`` (a frame read straight from the stream's shared-memory ring, see
:mod:`.frames`; the reply is ``{"ok": True, "result": {...}}``) and
``{"op": "release_frames", "owner", "incarnation"}`` (the stream's capture process
ended: unmap its ring). ``ping`` answers ``pid``, ``frames`` (read from shared
memory / ``overwritten`` / ``ring_gone``) and ``frame_rings`` (``{owner: ring}`` mapped).
Replies: ``{"ok": True, ...}`` or ``{"ok": False, "status": 400 | 409 | 410 | 500,
"error": "..."}`` -- 400 when the request is at fault (names, shapes, dtypes,
unreadable image), 409 when a frame's slot was overwritten before it was read,
410 when its ring is gone, 500 otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import cv2
import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from cloud_sync.manifest import TensorSpec

from .errors import BadInput, FrameUnavailable, ModelMismatch
from .frames import FrameRequest, RingCache
from .loader import LoadedApp
from .postprocess import classify
from .preprocess import image_to_tensor, pixels_to_tensor
from .tensors import check_feeds, check_outputs

logger = logging.getLogger(__name__)


UNLIMITED = 64


def run_slots(session) -> int:
    """Concurrent runs that fit the cores this process may use: cores // intra-op threads.

    Each ``session.run`` with N intra-op threads keeps N cores busy; letting more
    callers in at once only time-slices them (the B2 penalty of issue 3), so
    the rest wait their turn. A GPU session is not limited.
    """
    try:
        if "CPUExecutionProvider" != session.get_providers()[0]:
            return UNLIMITED
        threads = session.get_session_options().intra_op_num_threads
    except Exception:  # a stand-in session in tests
        return UNLIMITED
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, threads or cores or 1))


class Handler:
    def __init__(self, app: LoadedApp) -> None:
        self.app = app
        self.inflight = 0
        self._lock = threading.Lock()
        #: input signatures (name, dtype, shape) already checked against the model
        self._valid: set[tuple] = set()
        self._all_outputs = check_outputs(None, app.outputs)
        #: at most this many runs at once: more would only oversubscribe the worker's cores
        self.max_concurrent = run_slots(app.session)
        self._slots = (contextlib.nullcontext() if self.max_concurrent >= UNLIMITED
                       else threading.Lock() if self.max_concurrent == 1  # C-level, cheapest
                       else threading.BoundedSemaphore(self.max_concurrent))
        #: the camera streams' frame rings this worker reads (``classify_frame``)
        self.rings = RingCache()
        #: frames read from shared memory, and those refused: overwritten (409), ring gone (410)
        self.frames = {"read": 0, "overwritten": 0, "ring_gone": 0}
        m = app.manifest
        self.can_classify = m.preprocess is not None and m.postprocess is not None
        if self.can_classify:
            name = m.preprocess.input or next(iter(app.inputs))
            real = app.inputs[name]
            shape = [d if d >= 0 else None for d in real.shape]
            self._in = TensorSpec(name=name, dtype=real.dtype, shape=shape)
            self._out = m.postprocess.output or next(iter(app.outputs))
            if len(app.inputs) > 1:
                logger.warning("classify needs a single-input model; %s has %d inputs",
                               m.name, len(app.inputs))
                self.can_classify = False

    def handle(self, msg: object) -> dict:
        with self._lock:
            self.inflight += 1
        try:
            return self._dispatch(msg)
        except BadInput as err:
            return {"ok": False, "status": 400, "error": str(err)}
        except FrameUnavailable as err:
            with self._lock:
                self.frames["overwritten" if err.status == 409 else "ring_gone"] += 1
            return {"ok": False, "status": err.status, "error": str(err)}
        except Exception as err:  # the worker never dies on a request
            logger.exception("request failed")
            return {"ok": False, "status": 500, "error": f"{type(err).__name__}: {err}"}
        finally:
            with self._lock:
                self.inflight -= 1

    def _dispatch(self, msg: object) -> dict:
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "infer":
            return {"ok": True, "outputs": self.infer(msg.get("inputs"), msg.get("outputs"))}
        if op == "classify":
            result, tensor = self.classify(msg.get("image"))
            return {"ok": True, "result": result, "input": tensor}
        if op == "classify_frame":
            result = self.classify_frame(FrameRequest.parse(msg))
            if not msg.get("keep_scores"):
                result.pop("scores", None)
            return {"ok": True, "result": result}
        if op == "release_frames":
            inc = msg.get("incarnation")
            return {"ok": True, "released": self.rings.release(
                str(msg.get("owner")), int(inc) if isinstance(inc, int) else None)}
        if op == "ping":
            with self._lock:
                frames = dict(self.frames)
            return {"ok": True, "pid": os.getpid(), "frames": frames,
                    "frame_rings": self.rings.names()}
        if op == "meta":
            return {"ok": True, "meta": self.app.meta()}
        raise BadInput(f"unknown op {op!r}; one of infer, classify, classify_frame, "
                       "release_frames, ping, meta")

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            with self._slots:
                return self.app.session.run(names, feeds)
        except InvalidArgument as err:
            raise BadInput(f"the model rejected the input: {err}") from err

    def infer(self, inputs: object, outputs: object = None) -> dict[str, np.ndarray]:
        try:  # the same shapes as an earlier request skip the checks
            sig = tuple((n, a.dtype, a.shape) for n, a in inputs.items())
        except AttributeError:
            sig = None
        if sig is None or sig not in self._valid:
            check_feeds(inputs, self.app.inputs)
            if sig is not None and len(self._valid) < 1024:
                self._valid.add(sig)
        names = self._all_outputs if outputs is None else check_outputs(outputs, self.app.outputs)
        return dict(zip(names, self._run(names, inputs), strict=True))

    def classify(self, image: object) -> tuple[dict, np.ndarray]:
        if not self.can_classify:
            raise BadInput(f"app {self.app.manifest.name!r} has no image pre/postprocessing "
                           "(or more than one input); use infer")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise BadInput("image must be bytes (an encoded PNG/JPEG/...)")
        x = image_to_tensor(bytes(image), self.app.manifest.preprocess, self._in)
        self.app.inputs[self._in.name].check(x)  # e.g. no resize and an odd-sized image
        scores = self._run([self._out], {self._in.name: x})[0]
        return classify(scores, self.app.manifest.postprocess, self.app.labels), x

    def classify_frame(self, req: FrameRequest) -> dict:
        """Classify a camera frame read straight from its stream's shared-memory ring.

        The pixels are preprocessed from the slot itself (no copy); the slot's
        sequence number is checked before and after, so a frame the capture
        process overwrote meanwhile is refused (409), never classified torn.
        """
        if not self.can_classify:
            raise BadInput(f"app {self.app.manifest.name!r} has no image pre/postprocessing "
                           "(or more than one input); a camera stream cannot feed it")
        with self.rings.open(req) as ring:
            if req.slot >= ring.slots or _nbytes(req.shape) > ring.slot_bytes:
                raise BadInput(f"slot {req.slot} / shape {list(req.shape)} do not fit ring "
                               f"{req.ring!r} ({ring.slots} slots of {ring.slot_bytes} bytes)")
            view = ring.view(req.slot, req.seq, req.shape)
            if view is None:
                raise FrameUnavailable(409, f"frame {req.seq} was overwritten in slot {req.slot} "
                                            f"of {req.ring!r} before the worker read it")
            try:
                x = pixels_to_tensor(view, self.app.manifest.preprocess, self._in)
            finally:
                del view
            if not ring.holds(req.slot, req.seq):
                raise FrameUnavailable(409, f"frame {req.seq} was overwritten in slot {req.slot} "
                                            f"of {req.ring!r} while the worker read it")
        with self._lock:
            self.frames["read"] += 1
        self.app.inputs[self._in.name].check(x)
        scores = self._run([self._out], {self._in.name: x})[0]
        return classify(scores, self.app.manifest.postprocess, self.app.labels)

    def self_check(self) -> None:
        """One run before serving: proves pre/postprocessing fits, warms the session."""
        if self.can_classify:
            pre = self.app.manifest.preprocess
            h, w = pre.resize or (32, 32)
            _, png = cv2.imencode(".png", np.zeros((int(h), int(w), 3), np.uint8))
            try:
                self.classify(png.tobytes())
            except Exception as err:
                raise ModelMismatch(
                    [f"preprocess/postprocess do not fit the model: {err}"]) from err
            return
        feeds = {s.name: np.zeros([d if d >= 0 else 1 for d in s.shape], s.dtype)
                 for s in self.app.inputs.values() if s.dtype != "string"}
        if len(feeds) != len(self.app.inputs):
            return
        try:
            self.app.session.run(None, feeds)
        except Exception as err:  # generic models may need real data; serve anyway
            logger.warning("warm-up run on zeros failed (%s); serving anyway", err)


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
