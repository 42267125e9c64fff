"""Follow the desired state: fetch, verify, unpack, load, serve, report.

The cloud's retained ``state/desired`` message says which app versions this
node should run. The reconciler works towards it on its own thread:

    pending -> fetching (chunked over MQTT) -> verifying (sha256 + Ed25519)
            -> loading (a worker process) -> ready

A new version is loaded beside the old one and swapped in only when ready, so
clients see no failed request. A package that fails verification is counted
under its reason in ``rejected`` (visible in the reported state), deleted, and
not retried until the desired state changes; a transient failure (the fetch
timed out) is retried with backoff. The last desired state is kept in the
local store, so after a restart the node serves again from its local packages
without waiting for the cloud.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync import schemas
from cloud_sync.errors import BlobError, CloudSyncError, MessageRejected, PackageError
from cloud_sync.manifest import load_manifest
from cloud_sync.package import read_package

from .errors import InstallError
from .serving.registry import ServedApp
from .store import NodeStore

logger = logging.getLogger(__name__)

DESIRED_KEY = "desired_state"


class Reconciler:
    def __init__(
        self,
        *,
        node_id: str,
        store: NodeStore,
        fetcher: Any,
        supervisor: Any,
        registry: Any,
        trusted_keys: Callable[[], dict[str, bytes]],
        blobs_dir: Path,
        apps_dir: Path,
        on_change: Callable[[], None],
        on_event: Callable[..., None] | None = None,
        worker_threads: int = 1,
        retry_max: float = 60.0,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.fetcher = fetcher
        self.supervisor = supervisor
        self.registry = registry
        self.trusted_keys = trusted_keys
        self.blobs_dir = blobs_dir
        self.apps_dir = apps_dir
        self.on_change = on_change
        self.on_event = on_event or (lambda *a, **k: None)
        self.worker_threads = worker_threads
        self.retry_max = retry_max
        self.rejected: Counter[str] = Counter()
        self.desired: schemas.DesiredState | None = None
        self._reports: dict[str, schemas.AppReport] = {}
        self._running: dict[str, tuple[str, str]] = {}  # name -> (sha256, worker key)
        self._permanent: dict[str, str] = {}  # sha256 -> reason (not retried)
        self._lock = threading.Lock()
        self._wake: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # -- inputs --------------------------------------------------------------
    def on_desired_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT handler (network thread): validate, persist, wake the loop."""
        try:
            desired = schemas.parse(schemas.DesiredState, payload)
        except MessageRejected as err:
            self.count_rejected(f"desired_{err.reason}", err.detail)
            return
        if desired.node_id != self.node_id:
            self.count_rejected("desired_wrong_node", desired.node_id)
            return
        with self._lock:
            if self.desired is not None and desired.revision < self.desired.revision:
                logger.info("ignoring stale desired revision %d < %d",
                            desired.revision, self.desired.revision)
                return
            changed = self.desired is None or desired.revision != self.desired.revision \
                or desired.apps != self.desired.apps
            self.desired = desired
        self.store.put_json(DESIRED_KEY, desired.model_dump())
        if changed:
            self._permanent.clear()
            self._cancel.set()
            self._wake.put("desired")

    def count_rejected(self, reason: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        logger.warning("rejected (%s): %s", reason, detail)
        self.on_change()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        saved = self.store.get_json(DESIRED_KEY)
        if saved and self.desired is None:
            try:
                self.desired = schemas.DesiredState.model_validate(saved)
                logger.info("resuming last desired state, revision %d", self.desired.revision)
            except ValueError:
                logger.warning("stored desired state unreadable; waiting for the cloud")
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()
        self._wake.put("start")

    def stop(self) -> None:
        self._stop.set()
        self._cancel.set()
        self._wake.put("stop")
        if self._thread:
            self._thread.join(15)

    def reports(self) -> list[schemas.AppReport]:
        with self._lock:
            return list(self._reports.values())

    # -- loop --------------------------------------------------------------
    def _run(self) -> None:
        retry_in: float | None = None
        attempt = 0
        while not self._stop.is_set():
            try:
                self._wake.get(timeout=retry_in)
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            while not self._wake.empty():  # coalesce wake-ups
                self._wake.get_nowait()
            self._cancel.clear()
            try:
                transient = self._reconcile_once()
            except Exception:  # noqa: BLE001 - never let the loop die
                logger.exception("reconcile failed")
                transient = True
            if transient:
                attempt += 1
                retry_in = min(self.retry_max, 1.0 * 2 ** min(attempt, 10))
            else:
                attempt, retry_in = 0, None

    def _reconcile_once(self) -> bool:
        with self._lock:
            desired = self.desired
        if desired is None:
            self.registry.loaded = True
            return False
        transient = False
        wanted = {a.name: a for a in desired.apps}
        for ref in desired.apps:
            if self._cancel.is_set() or self._stop.is_set():
                return True
            try:
                self._ensure(ref)
            except InstallError as err:
                self._set(ref, "failed", error=str(err))
                if err.transient:
                    transient = True
                else:
                    self._permanent[ref.sha256] = err.reason
                    self.count_rejected(err.reason, f"{ref.name} {ref.version}: {err.detail}")
                    self.on_event("app_failed", "error", ref.name,
                                  {"version": ref.version, "reason": err.reason,
                                   "detail": err.detail[:500]})
        for name in list(self._running):
            if name not in wanted:
                self._remove(name)
        with self._lock:
            for name in list(self._reports):
                if name not in wanted:
                    del self._reports[name]
        self.registry.loaded = True
        self.on_change()
        return transient

    def _set(self, ref: schemas.AppRef, status: str, error: str | None = None,
             progress: float | None = None) -> None:
        with self._lock:
            self._reports[ref.name] = schemas.AppReport(
                name=ref.name, version=ref.version, sha256=ref.sha256, status=status,
                error=error, progress=progress)
        self.on_change()

    def _ensure(self, ref: schemas.AppRef) -> None:
        running = self._running.get(ref.name)
        if running and running[0] == ref.sha256:
            return
        if ref.sha256 in self._permanent:
            raise InstallError(self._permanent[ref.sha256], "not retried until desired changes")
        path = self.blobs_dir / ref.sha256
        if not path.exists():
            self._set(ref, "fetching", progress=0.0)
            last = [0.0]

            def progress(done: int, total: int) -> None:
                if time.monotonic() - last[0] > 0.5:
                    last[0] = time.monotonic()
                    self._set(ref, "fetching", progress=min(1.0, done / max(total, 1)))

            try:
                self.fetcher.fetch(ref.sha256, ref.size, progress=progress, timeout=300,
                                   cancel=self._cancel)
            except BlobError as err:
                transient = err.reason not in ("unknown_blob", "hash_mismatch", "size_mismatch")
                raise InstallError(f"fetch_{err.reason}".replace(" ", "_")[:40], str(err),
                                   transient=transient) from err
            except CloudSyncError as err:
                raise InstallError("fetch_failed", str(err), transient=True) from err
        self._set(ref, "verifying")
        app_dir = self._verify_and_unpack(ref, path)
        self._set(ref, "loading")
        self._load(ref, app_dir)
        self._set(ref, "ready")
        self.on_event("app_ready", "info", ref.name, {"version": ref.version, "sha256": ref.sha256})

    def _verify_and_unpack(self, ref: schemas.AppRef, path: Path) -> Path:
        try:
            pkg = read_package(path, self.trusted_keys(), expected_sha256=ref.sha256)
        except PackageError as err:
            path.unlink(missing_ok=True)
            raise InstallError(err.reason, err.detail) from err
        m = pkg.manifest
        if m.name != ref.name or m.version != ref.version:
            path.unlink(missing_ok=True)
            raise InstallError("manifest_mismatch",
                               f"package is {m.name} {m.version}, desired {ref.name} {ref.version}")
        app_dir = self.apps_dir / ref.name / ref.sha256[:16]
        if not (app_dir / ".complete").exists():
            tmp = app_dir.with_suffix(".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, data in pkg.members.items():
                (tmp / name).write_bytes(data)
            (tmp / ".complete").write_text(ref.sha256)
            if app_dir.exists():
                shutil.rmtree(app_dir)
            tmp.rename(app_dir)
        self.store.record_installed(ref.name, ref.version, ref.sha256, app_dir)
        return app_dir

    def _load(self, ref: schemas.AppRef, app_dir: Path) -> None:
        key = f"{ref.name}@{ref.sha256[:12]}"
        manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
        try:
            client = self.supervisor.start(key, app_dir, threads=self.worker_threads)
        except Exception as err:  # WorkerStartError and friends
            raise InstallError("worker_start_failed", str(err)[-500:], transient=False) from err
        labels = None
        pp = manifest.postprocess
        if pp and pp.labels_file and (app_dir / pp.labels_file).exists():
            labels = [ln.strip() for ln in (app_dir / pp.labels_file).read_text().splitlines()
                      if ln.strip()]
        self.registry.add(ServedApp(name=ref.name, version=ref.version, sha256=ref.sha256,
                                    manifest=manifest, client=client, labels=labels, ready=True))
        old = self._running.get(ref.name)
        self._running[ref.name] = (ref.sha256, key)
        if old and old[1] != key:
            self.supervisor.stop(old[1])
        logger.info("app %s %s ready (worker %s)", ref.name, ref.version, key)

    def _remove(self, name: str) -> None:
        sha, key = self._running.pop(name)
        self.registry.remove(name)
        self.supervisor.stop(key)
        logger.info("app %s removed (was %s)", name, sha[:12])
        self.on_event("app_removed", "info", name, {"sha256": sha})
