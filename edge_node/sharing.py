"""Upload level ``features``: the head's features of a sample, not its input.

At this level a sample's input never leaves the site; its feedback message
carries instead the vector the app's head consumes (:class:`Head.feature`),
computed by ONNX Runtime from the model that served it, with the model's
version and sha256 (docs/learning.md, "What leaves the site").

The agent stays free of ONNX Runtime, ``onnx`` and OpenCV (about 55 MB of RSS
together, more than half the management plane's budget): the features are
computed in a **helper process** (``python -m edge_node.sharing``), started on
the first sample that needs it and gone after ``idle_s`` without work. It holds
one :class:`~edge_node.learning.features.FeatureExtractor` per (app, version),
reads the stored sample from disk, turns it into the tensor the worker was fed
(an image through the app's preprocessing, a camera frame from its pixels, a
``.npy`` tensor as it was fed) and answers one JSON line per request. The
capture thread calls it when it puts a sample in the outbox (the upload path),
never on the request path.

When features cannot be had -- the model has no fine-tunable head
(``not_fine_tunable``), the model of that version is not on the node
(``no_model``), the input cannot be read (``bad_input``), the values are not
finite, the helper fails or times out -- :class:`FeaturesUnavailable` says why
and the caller falls back to ``metadata`` for that sample (counted, logged).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODULE = "edge_node.sharing"
#: a request may take this long (the first loads onnx and the model: ~1-2 s)
TIMEOUT_S = 60.0
#: the helper exits after this long without a request (its memory goes back)
IDLE_S = 120.0
#: the largest base64 feature vector one message may carry
MAX_B64 = 700 * 1024
#: extractors (app versions) the helper keeps loaded at once
MAX_EXTRACTORS = 8


class FeaturesUnavailable(Exception):
    """No features for this sample; ``kind`` is a short code, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def model_dir(reconciler: Any, store: Any, app: str, version: str) -> Path | None:
    """The installed dir of ``app``'s model at ``version`` (a site variant's or a
    package's), or None when that version is not on the node (any more)."""
    v = reconciler.variant(app)
    if v and v.get("version") == version:
        return Path(v["app_dir"])
    for r in store.all_installed():
        if r.get("name") == app and r.get("version") == version and r.get("app_dir"):
            return Path(r["app_dir"])
    return None


class FeatureSharing:
    """The agent's side: asks the helper process for one sample's features."""

    def __init__(self, model_dir: Callable[[str, str], Path | None] | None = None,
                 timeout_s: float = TIMEOUT_S, idle_s: float = IDLE_S) -> None:
        #: (app, version) -> the app dir of that version's model; set by the agent
        self.model_dir = model_dir
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        #: (app, version) -> reason: models with no head (asked once per version)
        self._refused: dict[tuple[str, str], str] = {}
        self.stats: dict[str, int] = {"requests": 0, "helper_starts": 0}

    def bind(self, reconciler: Any, store: Any) -> None:
        """Find each sample's model through the node's reconciler and store."""
        self.model_dir = lambda app, version: model_dir(reconciler, store, app, version)

    def features(self, app: str, version: str, input_type: str, path: str | Path) -> dict:
        """The :class:`cloud_sync.schemas.SampleFeatures` fields of one stored sample.
        Raises :class:`FeaturesUnavailable`."""
        key = (app, version)
        if key in self._refused:
            raise FeaturesUnavailable("not_fine_tunable", self._refused[key])
        app_dir = self.model_dir(app, version) if self.model_dir else None
        if app_dir is None:
            raise FeaturesUnavailable("no_model", f"the model of {app} {version} is not on "
                                      "this node")
        req = {"app": app, "version": version, "app_dir": str(app_dir),
               "input_type": input_type, "path": str(path)}
        with self._lock:
            self.stats["requests"] += 1
            answer = self._ask(req)
        if not answer.get("ok"):
            kind, reason = answer.get("kind", "error"), answer.get("reason", "?")
            if kind == "not_fine_tunable":
                self._refused[key] = reason
            raise FeaturesUnavailable(kind, reason)
        if len(answer["b64"]) > MAX_B64:
            raise FeaturesUnavailable("too_large", f"{answer['n']} features are "
                                      f"{len(answer['b64'])} bytes of base64, over {MAX_B64}")
        return {k: answer[k] for k in ("tensor", "head", "n", "b64", "model_sha256")} | {
            "model_version": version}

    # -- the helper process -------------------------------------------------------
    def _ask(self, req: dict) -> dict:
        for attempt in (1, 2):  # a helper that went idle and exited: start a new one
            proc = self._ensure()
            try:
                proc.stdin.write((json.dumps(req) + "\n").encode())
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                if attempt == 2:
                    raise FeaturesUnavailable("helper_failed", "the features helper exited")
                continue
            line = self._readline(proc, time.monotonic() + self.timeout_s)
            if line is None:
                alive = proc.poll() is None
                self._kill()
                if alive:
                    raise FeaturesUnavailable("timeout", f"no features within "
                                              f"{self.timeout_s:g} s")
                if attempt == 2:
                    raise FeaturesUnavailable("helper_failed", "the features helper exited "
                                              f"with code {proc.returncode}")
                continue
            try:
                return json.loads(line)
            except ValueError:
                self._kill()
                raise FeaturesUnavailable("helper_failed", f"bad answer {line[:200]!r}")
        raise FeaturesUnavailable("helper_failed", "unreachable")  # pragma: no cover

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--idle", str(self.idle_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._buf = b""
        self.stats["helper_starts"] += 1
        logger.info("features helper started (pid %d)", self._proc.pid)
        return self._proc

    def _readline(self, proc: subprocess.Popen, deadline: float) -> bytes | None:
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:  # EOF: it exited
                proc.wait(5)
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _kill(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            p = self._proc
            if p is not None and p.poll() is None:
                try:  # EOF on stdin: it exits by itself
                    p.stdin.close()
                    p.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()


# -- the helper process (python -m edge_node.sharing) ----------------------------------

def sample_tensor(input_type: str, data: bytes, manifest: Any, spec: Any) -> Any:
    """The tensor the worker was fed for a stored sample (no batch axis): an image
    through the app's preprocessing, a camera frame from its pixels, a ``.npy``
    tensor as it was sent (a leading batch axis of 1 dropped)."""
    import io

    import numpy as np

    if input_type == "tensor/npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    elif input_type in ("image/png", "image/jpeg"):
        from edge_node.streams.snapshot import is_frame_png
        from edge_node.worker.preprocess import image_to_tensor, pixels_to_tensor

        if manifest.preprocess is None:
            raise ValueError("an image sample, but the app has no preprocessing")
        if is_frame_png(data):  # a camera frame: the worker made its tensor from the pixels
            import cv2

            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if pixels is None:
                raise ValueError("unreadable camera frame PNG")
            arr = pixels_to_tensor(pixels, manifest.preprocess, spec)
        else:
            arr = image_to_tensor(data, manifest.preprocess, spec)
    else:
        raise ValueError(f"no input to compute features from ({input_type})")
    arr = np.asarray(arr)
    return arr[0] if arr.ndim >= 2 and arr.shape[0] == 1 else arr


class _Extractors:
    """One FeatureExtractor per (app, version) (and the refusals), in the helper;
    at most :data:`MAX_EXTRACTORS`, least recently used dropped first."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, str], Any] = {}

    def get(self, app: str, version: str, app_dir: str) -> Any:
        key = (app, version, app_dir)
        hit = self._cache.pop(key, None)
        if hit is None:
            hit = self._load(Path(app_dir))
            while len(self._cache) >= MAX_EXTRACTORS:  # the least recently used goes
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = hit
        if isinstance(hit, Exception):
            raise hit
        return hit

    @staticmethod
    def _load(app_dir: Path) -> Any:
        from cloud_sync.manifest import load_manifest
        from edge_node.learning import FeatureExtractor, NotFineTunable, find_app_head

        try:
            import onnx  # noqa: F401 - the head is found in the graph
        except ImportError as err:
            return FeaturesUnavailable("missing_dependency", f"{err} (the features level "
                                       "needs the onnx package on the node)")
        try:
            head, model_path, manifest = find_app_head(app_dir)
        except NotFineTunable as err:
            return FeaturesUnavailable("not_fine_tunable", err.reason)
        except (OSError, ValueError) as err:
            return FeaturesUnavailable("no_model", f"{type(err).__name__}: {err}")
        try:
            fx = FeatureExtractor(model_path, head, threads=1)
        except ValueError as err:  # e.g. a model with two inputs
            return FeaturesUnavailable("not_fine_tunable", str(err))
        m = load_manifest(manifest)
        sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
        return {"fx": fx, "head": head, "manifest": m, "spec": m.model.inputs[0],
                "sha256": sha}


def _answer(ex: _Extractors, req: dict) -> dict:
    import numpy as np

    try:
        e = ex.get(req["app"], req["version"], req["app_dir"])
    except FeaturesUnavailable as err:
        return {"ok": False, "kind": err.kind, "reason": err.reason}
    try:
        data = Path(req["path"]).read_bytes()
        x = sample_tensor(req["input_type"], data, e["manifest"], e["spec"])
        f = e["fx"](x[None])
    except Exception as err:  # noqa: BLE001 - one bad sample is an answer, not a crash
        return {"ok": False, "kind": "bad_input", "reason": f"{type(err).__name__}: {err}"[:300]}
    f = np.asarray(f[0], "<f4")
    if not np.isfinite(f).all():
        return {"ok": False, "kind": "non_finite",
                "reason": f"{int((~np.isfinite(f)).sum())} of {f.size} features are not finite"}
    return {"ok": True, "tensor": e["head"].feature, "head": e["head"].node, "n": int(f.size),
            "b64": base64.b64encode(f.tobytes()).decode(), "model_sha256": e["sha256"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="features helper: JSON lines in, JSON lines out")
    ap.add_argument("--idle", type=float, default=IDLE_S)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        os.nice(5)  # background work: inference comes first
    except OSError:
        pass
    ex = _Extractors()
    fd = sys.stdin.fileno()
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], args.idle)
        if not ready:
            return 0  # idle: the agent starts a new one when it needs it
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return 0  # the agent closed our stdin
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            try:
                req = json.loads(line)
                out = _answer(ex, req)
            except Exception as err:  # noqa: BLE001
                out = {"ok": False, "kind": "error", "reason": f"{type(err).__name__}: {err}"}
            sys.stdout.buffer.write((json.dumps(out) + "\n").encode())
            sys.stdout.buffer.flush()


if __name__ == "__main__":
    sys.exit(main())
