"""Site adaptation: fine-tune an app on its labelled samples, judge, shadow, switch.

One run per request (``POST /api/v1/apps/<app>/finetune``, ``aidc node finetune``):

    training (a job under the scheduler: inside the training windows, preempted
    and resumed when inference needs the cores)
      -> judged (OUT/gate.json: served model vs candidate on the held-out and
         replay sets)
      -> rejected (the reason is recorded and shown; the served model stays)
       | shadow (the candidate's own worker answers a copy of live requests and a
         sample of the app's camera frames, off the request and frame paths;
         agreement, errors and latency are compared)
      -> promoted (the reconciler swaps the worker in, new one first: no failed
         request)  -> rolled_back (one command; the package's model again)

The gate (manifest ``learning.gate``): the candidate must beat the served
model on the site's held-out samples by ``min_gain`` and lose at most
``max_regression`` on the replay set (the base distribution), with at least
``min_heldout`` held-out samples. A promoted model is a *site variant*
``<base version>+site.<n>``: the desired version stays the cloud's; a new
version from the cloud replaces it (its samples stay for the next run).
Every step is a row in ``finetune_runs`` with its metrics and lineage, and an
event to the cloud.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .learning.finetune_job import sha256_file
from .learning.gate import decide  # noqa: F401 - re-exported for callers
from .resources import worker_settings
from .scheduling.jobs import JobSpec
from .worker.errors import WorkerError

logger = logging.getLogger(__name__)

ACTIVE = ("training", "shadow")
#: the served model counts as confident (for the shadow's agreement check) above this
CONFIDENT = 0.9
#: camera frames a second (per app, all its streams together) copied to a shadow at
#: most; the rest are skipped (counted), so a shadow costs the agent a bounded amount
SHADOW_FRAMES_PER_S = 5.0
#: why a camera frame was not compared in a shadow (``frames_skipped`` in its summary)
FRAME_SKIPS = ("rate", "busy", "overwritten", "ring_gone", "no_frame")


class AdaptError(Exception):
    def __init__(self, status: int, reason: str, detail: Any) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


class Shadow:
    """A candidate's worker answering copies of live requests and a sample of the
    app's camera frames, off the request and frame paths.

    A request comes with the tensor the served model was given. A camera frame
    comes as its :class:`~edge_node.streams.proc.FrameRef` (where it sits in the
    stream's shared-memory ring): the candidate's worker reads and preprocesses the
    pixels itself (``classify_frame``), exactly as the served worker did, so the
    agent copies nothing. At most ``frames_per_s`` frames a second are taken; a
    frame the capture process overwrote before the candidate read it is skipped.
    Nothing here ever makes a request or a stream wait: a full queue skips.
    """

    def __init__(self, run_id: str, app: str, key: str, client: Any, input_name: str,
                 output: str, want: int, on_done: Callable[["Shadow"], None],
                 timeout_s: float = 600.0,
                 frames_per_s: float = SHADOW_FRAMES_PER_S) -> None:
        self.run_id, self.app, self.key, self.client = run_id, app, key, client
        self.input_name, self.output, self.want = input_name, output, want
        self.on_done = on_done
        self.deadline = time.monotonic() + timeout_s
        self.timed_out = False
        self.stats: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter({k: 0 for k in FRAME_SKIPS})
        self.latency_ms: list[float] = []
        self._frame_gap = 1.0 / frames_per_s if frames_per_s > 0 else float("inf")
        self._next_frame = 0.0  # monotonic time the next frame may be taken
        self._frame_lock = threading.Lock()
        self._q: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name=f"shadow-{app}", daemon=True)
        self._thread.start()

    def offer(self, result: dict, tensor: np.ndarray) -> None:
        try:
            self._q.put_nowait(("request", result, tensor))
        except queue.Full:
            self.stats["dropped"] += 1  # the shadow never slows the served path

    def offer_frame(self, result: dict, frame: Any) -> None:
        """A camera frame's result (the stream's thread, right after the served model
        answered): taken if the rate allows, by reference (or the copy the stream made
        already, on the copy path). Never blocks, never copies pixels out of the ring."""
        now = time.monotonic()
        with self._frame_lock:
            if now < self._next_frame:
                self.skipped["rate"] += 1
                return
            self._next_frame = now + self._frame_gap
        ref = getattr(frame, "ref", None)
        if ref is not None:
            item = ("frame", _served(result), ref)
        else:
            pixels = getattr(frame, "pixels", None)  # the copy path: copied already
            if pixels is None:
                self._skip("no_frame")
                return
            item = ("pixels", _served(result), pixels)
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._skip("busy")

    def _skip(self, why: str) -> None:
        with self._frame_lock:  # several stream threads count at once
            self.skipped[why] += 1

    def _skipped(self) -> dict[str, int]:
        with self._frame_lock:
            return dict(self.skipped)

    def stop(self) -> None:
        self._q.put(None)

    def _candidate_index(self, kind: str, payload: Any) -> int | None:
        """The candidate's top-1 class; None for a frame it could not read (skipped)."""
        if kind == "request":
            out = self.client.infer({self.input_name: payload}, [self.output])
            return int(np.asarray(out[self.output]).reshape(-1).argmax())
        if kind == "pixels":
            from .streams.adapters import encode_frame

            result, _ = self.client.classify(encode_frame(payload))
            return int(result["index"])
        try:
            reply = self.client.request({"op": "classify_frame", **payload.message(),
                                         "keep_scores": False})
        except WorkerError as err:
            if err.status in (409, 410):  # overwritten meanwhile / its ring is gone
                self._skip("overwritten" if err.status == 409 else "ring_gone")
                return None
            raise
        return int(reply["result"]["index"])

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:  # not enough live requests in time (a camera-only app)
                self.timed_out = True
                self.on_done(self)
                return
            if item is None:
                return
            kind, result, payload = item
            t0 = time.perf_counter()
            try:
                index = self._candidate_index(kind, payload)
            except Exception as err:  # noqa: BLE001 - counted; the verdict says so
                self.stats["errors"] += 1
                self.stats["frame_errors" if kind != "request" else "request_errors"] += 1
                logger.warning("shadow %s (%s): %s", self.app, kind, err)
            else:
                if index is None:
                    continue
                self.latency_ms.append((time.perf_counter() - t0) * 1000)
                self.stats["compared"] += 1
                self.stats["frames" if kind != "request" else "requests"] += 1
                agree = index == int(result.get("index", -1))
                self.stats["agreed"] += agree
                if float(result.get("score", 0.0)) >= CONFIDENT:
                    self.stats["confident"] += 1
                    self.stats["confident_agreed"] += agree
            if self.stats["compared"] + self.stats["errors"] >= self.want:
                self.on_done(self)
                return

    def summary(self) -> dict[str, Any]:
        s = self.stats
        lat = sorted(self.latency_ms)
        return {"compared": s["compared"], "requests": s["requests"], "frames": s["frames"],
                "errors": s["errors"], "request_errors": s["request_errors"],
                "frame_errors": s["frame_errors"], "dropped": s["dropped"],
                "frames_skipped": self._skipped(),
                "agreement": s["agreed"] / s["compared"] if s["compared"] else None,
                "confident": s["confident"],
                "confident_agreement": s["confident_agreed"] / s["confident"]
                if s["confident"] else None,
                "p50_ms": lat[len(lat) // 2] if lat else None, "timed_out": self.timed_out}


#: a run's state -> the event that says so
STATE_EVENTS = {"training": "finetune_started", "shadow": "finetune_shadow",
                "promoted": "model_promoted", "rolled_back": "model_rolled_back",
                "rejected": "finetune_rejected", "failed": "finetune_failed"}


def _served(result: dict) -> dict:
    """What the shadow needs of a served result (not its scores)."""
    return {"index": result.get("index", -1), "score": result.get("score", 0.0)}


class SiteLearning:
    def __init__(self, *, store: Any, jobs: Any, scheduler: Any, reconciler: Any,
                 registry: Any, supervisor: Any, placement: Any, data_dir: Path,
                 emit_event: Callable[..., None], card: str = "cpu",
                 shadow_frames_per_s: float = SHADOW_FRAMES_PER_S) -> None:
        self.store, self.jobs, self.scheduler = store, jobs, scheduler
        self.reconciler, self.registry = reconciler, registry
        self.supervisor, self.placement = supervisor, placement
        self.dir = data_dir / "learning"
        self.emit_event = emit_event
        self.card = card
        self.shadow_frames_per_s = shadow_frames_per_s
        self._lock = threading.RLock()
        self._shadows: dict[str, Shadow] = {}  # app -> shadow

    # -- requests ---------------------------------------------------------------
    def _served(self, app: str) -> tuple[Any, dict, Path]:
        served = self.registry.get(app)
        now = self.reconciler.serving(app)
        if served is None or now is None:
            raise AdaptError(404, "unknown_app", f"{app!r} is not served on this node")
        inst = self.store.installed(now["sha256"])
        if inst is None:
            raise AdaptError(409, "not_installed", f"{app}'s package is not on disk")
        variant = self.reconciler.variant(app) if now["variant"] else None
        return served, inst, Path(variant["app_dir"] if variant else inst["app_dir"])

    def request(self, app: str, by: str | None = None, config: dict | None = None) -> dict:
        """Start a fine-tune of ``app`` on its labelled samples; the run row."""
        with self._lock:
            served, inst, app_dir = self._served(app)
            gate = served.manifest.learning.gate
            busy = self.store.runs(app, ACTIVE, limit=1)
            if busy:
                raise AdaptError(409, "finetune_running", {
                    "run_id": busy[0]["run_id"], "state": busy[0]["state"],
                    "hint": "wait for it, or cancel its job"})
            labels = served.labels or []
            rows = self.store.labelled_samples(app)
            usable = [r for r in rows if r["label"] in labels]
            train = [r for r in usable if not r["heldout"]]
            held = [r for r in usable if r["heldout"]]
            if len(train) < gate.min_samples or len(held) < gate.min_heldout:
                raise AdaptError(409, "not_enough_samples", {
                    "train": len(train), "heldout": len(held),
                    "need": {"train": gate.min_samples, "heldout": gate.min_heldout},
                    "hint": "label more samples (GET /api/v1/labelling/queue)"})
            run_id = f"ft-{app}-{uuid.uuid4().hex[:8]}"
            run_dir = self.dir / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            listing = {"samples": [{
                "sample_id": r["sample_id"], "path": r["input_path"],
                "input_type": r["input_type"], "label_index": labels.index(r["label"]),
                "heldout": bool(r["heldout"])} for r in usable]}
            (run_dir / "samples.json").write_text(json.dumps(listing))
            manifest = served.manifest
            replay = app_dir / manifest.learning.replay if manifest.learning.replay else None
            args = ["--app-dir", str(app_dir), "--samples-list", str(run_dir / "samples.json"),
                    "--out", str(run_dir / "candidate")]
            if replay is not None and replay.exists():
                args += ["--replay", str(replay)]
            for k, v in (config or {}).items():
                args += [f"--{k.replace('_', '-')}", str(v)]
            lineage = {"base": {"version": served.version, "package_sha256": inst["sha256"],
                                "app_dir": str(app_dir)},
                       "samples": {"train": len(train), "heldout": len(held),
                                   "labelled_by": sorted({r["labelled_by"] or "?"
                                                          for r in usable})},
                       "replay": str(replay) if replay is not None else None,
                       "config": config or {}}
            self.store.add_run({"run_id": run_id, "app": app, "state": "training",
                                "requested_by": by, "base_version": served.version,
                                "base_sha256": inst["sha256"], "lineage": json.dumps(lineage)})
            from .learning.site_job import MODULE

            job = self.jobs.submit(JobSpec(name=f"finetune-{app}"[:64], module=MODULE,
                                           args=args, card=self.card, priority=1))
            self.store.update_run(run_id, job_id=job.job_id)
        self._emit(run_id, "training", app, {
            "run_id": run_id, "job_id": job.job_id, "base_version": served.version,
            "train": len(train), "heldout": len(held), "by": by})
        return self.store.get_run(run_id)

    # -- the job's outcome --------------------------------------------------------
    def on_job_event(self, type: str, data: dict) -> None:
        """From the scheduler: a fine-tune job finished or failed."""
        if type not in ("job_done", "job_failed"):
            return
        runs = [r for r in self.store.runs(states=("training",), limit=1000)
                if r["job_id"] == data.get("job_id")]
        if not runs:
            return
        run = runs[0]
        try:
            if type == "job_failed":
                reason = str(data.get("reason") or "failed")
                if "not fine-tunable" in reason:
                    reason = "not fine-tunable: " + reason.split("not fine-tunable:", 1)[1]\
                        .strip().splitlines()[0]
                self._finish(run, "failed", reason)
                return
            self._judge(run)
        except Exception as err:  # noqa: BLE001 - a run must end in a state, not hang
            logger.exception("fine-tune run %s", run["run_id"])
            self._finish(run, "failed", f"internal: {err}"[:500])

    def _judge(self, run: dict) -> None:
        out = self.dir / run["run_id"] / "candidate"
        gate_doc = json.loads((out / "gate.json").read_text())
        ft = json.loads((out / "finetune.json").read_text())
        served = self.registry.get(run["app"])
        gate = served.manifest.learning.gate if served else None
        acc = gate_doc["accuracy"]
        metrics = {"heldout": {k: acc.get("heldout", {}).get(k) for k in
                               ("n", "base", "candidate")},
                   "replay": {k: acc.get("replay", {}).get(k) for k in
                              ("n", "base", "candidate")},
                   "site_train": ft["metrics"].get("site_train"),
                   "layers": len(ft.get("layers") or [1]),
                   "candidates": gate_doc.get("candidates"),
                   "train_s": ft["training"]["train_s"], "iterations":
                   ft["training"]["iterations"], "skipped": gate_doc["prepared"]["skipped"]}
        lineage = {**(run["lineage"] or {}), "model_sha256": ft["model"]["sha256"],
                   "base_model_sha256": ft["base_model"]["sha256"],
                   "train_ids": gate_doc["train_ids"], "heldout_ids": gate_doc["heldout_ids"],
                   "job_id": run["job_id"]}
        self.store.update_run(run["run_id"], metrics=metrics, lineage=lineage,
                              model_sha256=ft["model"]["sha256"])
        if gate is None:
            self._finish(run, "rejected", "the app is no longer served")
            return
        now = self.reconciler.serving(run["app"])
        if now is None or now["sha256"] != run["base_sha256"]:
            self._finish(run, "rejected", "the served version changed while it trained")
            return
        passed, reason = decide(gate, acc)
        if not passed:
            self._finish(run, "rejected", reason, metrics=metrics)
            return
        app_dir = self._install(run, out, ft)
        self.store.update_run(run["run_id"], app_dir=str(app_dir), reason=reason)
        run = self.store.get_run(run["run_id"])
        if gate.shadow_requests <= 0:
            self._promote(run["run_id"], reason)
        else:
            self._start_shadow(run, app_dir, served, gate)

    def _install(self, run: dict, out: Path, ft: dict) -> Path:
        """The candidate as an app dir: the base app's files, the new model."""
        base = Path(run["lineage"]["base"]["app_dir"])
        dst = base.parent / f"site-{ft['model']['sha256'][:16]}"
        if not (dst / ".complete").exists():
            tmp = dst.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(base, tmp)
            (tmp / ".complete").unlink(missing_ok=True)
            shutil.copyfile(out / ft["model"]["file"], tmp / ft["model"]["file"])
            for name in ("finetune.json", "gate.json"):
                shutil.copyfile(out / name, tmp / name)
            if sha256_file(tmp / ft["model"]["file"]) != ft["model"]["sha256"]:
                raise RuntimeError("the candidate model changed on disk")
            (tmp / ".complete").write_text(ft["model"]["sha256"])
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)
        return dst

    def _start_shadow(self, run: dict, app_dir: Path, served: Any, gate: Any) -> None:
        key = f"shadow-{run['app']}@{run['model_sha256'][:12]}"
        sl = self.placement.get(run["app"])
        client = self.supervisor.start(key, app_dir, settings=worker_settings(sl)) \
            if sl is not None else self.supervisor.start(key, app_dir)
        spec = served.manifest.model.inputs[0]
        output = (served.manifest.postprocess.output if served.manifest.postprocess else None) \
            or served.manifest.model.outputs[-1].name
        sh = Shadow(run["run_id"], run["app"], key, client, spec.name, output,
                    gate.shadow_requests, self._shadow_done, gate.shadow_timeout_s,
                    self.shadow_frames_per_s)
        with self._lock:
            self._shadows[run["app"]] = sh
        self.store.update_run(run["run_id"], state="shadow")
        self._emit(run["run_id"], "shadow", run["app"], {
            "run_id": run["run_id"], "requests": gate.shadow_requests})

    def observe(self, app: str, result: dict, tensor: np.ndarray | None) -> None:
        """Every served result (request path): copied to the app's shadow, if any."""
        sh = self._shadows.get(app)
        if sh is not None and tensor is not None:
            sh.offer(result, tensor)

    def observe_frame(self, app: str, result: dict, frame: Any) -> None:
        """Every camera frame's result (the stream's thread): a sample of them, at a
        bounded rate, to the app's shadow, if any. One dict lookup when there is none."""
        sh = self._shadows.get(app)
        if sh is not None and frame is not None:
            sh.offer_frame(result, frame)

    def _shadow_done(self, sh: Shadow) -> None:
        with self._lock:
            if self._shadows.get(sh.app) is sh:
                del self._shadows[sh.app]
        summary = sh.summary()
        self.supervisor.stop(sh.key)
        run = self.store.get_run(sh.run_id)
        metrics = {**(run["metrics"] or {}), "shadow": summary}
        self.store.update_run(sh.run_id, metrics=metrics)
        served = self.registry.get(sh.app)
        gate = served.manifest.learning.gate if served else None
        if summary["errors"]:
            self._finish(run, "rejected", f"the candidate failed {summary['errors']} of "
                         f"{summary['compared'] + summary['errors']} shadow requests and "
                         f"camera frames ({summary['request_errors']} requests, "
                         f"{summary['frame_errors']} frames)")
        elif gate is not None and summary["confident_agreement"] is not None and \
                summary["confident_agreement"] < gate.shadow_min_agreement:
            self._finish(run, "rejected", (
                f"in shadow it disagreed with the served model where that was sure: "
                f"{summary['confident_agreement']:.2f} < {gate.shadow_min_agreement:g}"))
        elif summary["compared"] == 0:
            # no live request and no camera frame within the time (or every frame
            # was overwritten before the candidate read it): the gate decides alone
            self._promote(sh.run_id, (run["reason"] or "") + "; shadow: no live request "
                          f"or camera frame to compare in "
                          f"{gate.shadow_timeout_s if gate else '?'} s, "
                          "promoted on the gate alone")
        else:
            self._promote(sh.run_id, (run["reason"] or "") + f"; shadow: {summary['compared']}"
                          f" compared ({summary['frames']} camera frames, "
                          f"{summary['requests']} requests)"
                          f"{' (timed out)' if summary['timed_out'] else ''}, "
                          f"agreement {summary['agreement']:.2f}")

    # -- switch and rollback ------------------------------------------------------
    def _version_for(self, run: dict) -> str:
        n = 1 + sum(1 for r in self.store.runs(run["app"], limit=10000)
                    if r["version"] and r["base_sha256"] == run["base_sha256"])
        return f"{run['base_version'].split('+')[0]}+site.{n}"

    def _promote(self, run_id: str, reason: str) -> None:
        run = self.store.get_run(run_id)
        version = self._version_for(run)
        self.store.update_run(run_id, state="promoted", reason=reason, version=version)
        for old in self.store.runs(run["app"], ("promoted",)):
            if old["run_id"] != run_id:
                self.store.update_run(old["run_id"], state="superseded")
        self.reconciler.set_variant(run["app"], {
            "base_sha256": run["base_sha256"], "app_dir": self.store.get_run(run_id)["app_dir"],
            "version": version, "sha256": run["model_sha256"], "run_id": run_id})
        logger.info("fine-tune %s of %s promoted as %s (%s)", run_id, run["app"], version, reason)
        self._emit(run_id, "promoted", run["app"], {
            "run_id": run_id, "version": version, "base_version": run["base_version"],
            "reason": reason, "metrics": self.store.get_run(run_id)["metrics"]})

    def rollback(self, app: str, by: str | None = None) -> dict:
        """Back to the package's model (the version the cloud assigned)."""
        variant = self.reconciler.variant(app)
        if variant is None:
            raise AdaptError(409, "nothing_to_roll_back",
                             f"{app} serves its package's model already")
        self.reconciler.set_variant(app, None)
        run_id = variant.get("run_id")
        data = {"run_id": run_id, "from_version": variant.get("version"), "by": by}
        if run_id and self.store.get_run(run_id):
            self.store.update_run(run_id, state="rolled_back",
                                  reason=f"rolled back by {by or 'an operator'}")
            self._emit(run_id, "rolled_back", app, data)
        else:
            self.emit_event("model_rolled_back", app=app, severity="warning", data=data)
        return {"app": app, "rolled_back": variant.get("version"), "run_id": run_id}

    def _finish(self, run: dict, state: str, reason: str, metrics: dict | None = None) -> None:
        self.store.update_run(run["run_id"], state=state, reason=reason)
        logger.info("fine-tune %s of %s: %s (%s)", run["run_id"], run["app"], state, reason)
        self._emit(run["run_id"], state, run["app"], {
            "run_id": run["run_id"], "reason": reason,
            "metrics": metrics or (self.store.get_run(run["run_id"]) or {}).get("metrics")})

    def _emit(self, run_id: str, state: str, app: str, data: dict) -> None:
        """The event of a run's new ``state`` (committed just before), then the state
        marked sent (``event_sent``). Its msg_id comes from the run and the state:
        sent again at the next start after a kill -9 in between, it is kept once."""
        type = STATE_EVENTS.get(state, "finetune_" + state)
        severity = "warning" if state in ("failed", "rolled_back") else "info"
        mid = uuid.uuid5(uuid.NAMESPACE_URL, f"aidc:finetune:{run_id}:{state}").hex
        if self.emit_event(type, app=app, severity=severity, data=data, msg_id=mid) is False:
            return  # the outbox refused it: sent again at the next start
        self.store.update_run(run_id, event_sent=state)

    def _resend(self, run: dict) -> None:
        """A run's state whose event never reached the outbox, rebuilt from its row."""
        rid, state = run["run_id"], run["state"]
        if state == "training":
            samples = (run.get("lineage") or {}).get("samples") or {}
            data = {"run_id": rid, "job_id": run.get("job_id"),
                    "base_version": run.get("base_version"), "train": samples.get("train"),
                    "heldout": samples.get("heldout"), "by": run.get("requested_by")}
        elif state == "promoted":
            data = {"run_id": rid, "version": run.get("version"),
                    "base_version": run.get("base_version"), "reason": run.get("reason"),
                    "metrics": run.get("metrics")}
        elif state == "rolled_back":
            data = {"run_id": rid, "from_version": run.get("version"), "by": None}
        else:
            data = {"run_id": rid, "reason": run.get("reason"), "metrics": run.get("metrics")}
        self._emit(rid, state, run["app"], data)

    def recover(self) -> None:
        """At start: a run whose job ended while the agent was down gets its verdict
        now; a run left in shadow (its worker died with the agent) is rejected with
        that reason. A job still queued or preempted is resumed by the scheduler.
        First, a run whose state's event never reached the outbox (the agent died
        between the two commits) gets it sent (a run left in shadow gets its
        verdict's instead)."""
        for run in self.store.runs(limit=100_000):
            if run["state"] in STATE_EVENTS and run["state"] != "shadow" \
                    and run.get("event_sent") != run["state"]:
                try:
                    self._resend(run)
                except Exception:  # noqa: BLE001 - never stops the node starting
                    logger.exception("fine-tune run %s: event not sent", run["run_id"])
        for run in self.store.runs(states=("shadow",), limit=1000):
            self._finish(run, "rejected", "the node restarted during the shadow; request "
                         "the fine-tune again")
        for run in self.store.runs(states=("training",), limit=1000):
            try:
                job = self.jobs.get(run["job_id"])
            except Exception:  # noqa: BLE001 - the job row is gone
                self._finish(run, "failed", "its training job is gone")
                continue
            if job.state in ("done", "failed"):
                threading.Thread(target=self.on_job_event, name="finetune-verdict",
                                 args=("job_" + job.state, {"job_id": job.job_id,
                                                            "reason": job.reason}),
                                 daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            shadows, self._shadows = list(self._shadows.values()), {}
        for sh in shadows:
            sh.stop()
            self.supervisor.stop(sh.key)

    def status(self, app: str | None = None) -> dict:
        return {"runs": self.store.runs(app, limit=20),
                "shadows": {a: s.summary() for a, s in list(self._shadows.items())},
                "variants": {a: self.reconciler.variant(a) for a in self.registry.names()
                             if self.reconciler.variant(a)}}
