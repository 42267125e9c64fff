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
without waiting for the cloud. :meth:`Reconciler.reinstall` installs a running
version again (the ``model_integrity`` health check's remedy for a damaged
model file): package verified again, fetched again if it is gone from the
cache, unpacked afresh, a new worker started. :meth:`Reconciler.relocate`
places apps afresh and restarts their workers with the new slice's settings
(the ``accelerator`` health check's remedy: apps off a lost card onto the CPU
if they fit, and back when the card returns); an app whose slice is on a card
marked lost is placed afresh by itself. One that fits nowhere is not left half
deployed: its worker is stopped, its slice released, the app reported failed
with why, and placed again (retried with backoff) once it fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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
from .resources import Placement, PlacementError, SliceRequest, discover_cards, worker_settings
from .serving.batching import policy_for
from .serving.registry import ServedApp
from .store import NodeStore

logger = logging.getLogger(__name__)

DESIRED_KEY = "desired_state"
VARIANTS_KEY = "site_variants"
#: app -> the version that last ran stably ({sha256, version, app_dir})
LAST_GOOD_KEY = "last_good_versions"
#: sha256 -> why: versions rolled back from after a crash loop (kept across restarts)
CRASH_LOOPED_KEY = "crash_looped"


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
        on_training: Callable[[schemas.TrainingSchedule | None], None] | None = None,
        on_desired: Callable[[schemas.DesiredState], None] | None = None,
        placement: Placement | None = None,
        overrides: dict[str, dict] | None = None,
        batching: dict[str, Any] | None = None,
        retry_max: float = 60.0,
        check_interval: float = 10.0,
        keep_versions: int = 2,
        stable_s: float = 60.0,
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
        #: called with the desired state's training windows (None: the node's
        #: config) when they change, and once at start from the saved state
        self.on_training = on_training or (lambda _t: None)
        #: called with every accepted desired state (and the saved one at start)
        self.on_desired = on_desired or (lambda _d: None)
        self.placement = placement or Placement(discover_cards())
        self.overrides = overrides or {}
        self.batching = batching or {}  # app -> BatchOverride (the node's config)
        self.retry_max = retry_max
        self.check_interval = check_interval
        self.keep_versions = keep_versions
        self._mismatches: Counter[str] = Counter()  # sha256 -> hash mismatches seen
        self.rejected: Counter[str] = Counter()
        self.desired: schemas.DesiredState | None = None
        self._reports: dict[str, schemas.AppReport] = {}
        self._running: dict[str, tuple[str, str]] = {}  # name -> (sha256, worker key)
        #: name -> a model fine-tuned on site that replaces the package's model while
        #: the desired version is the one it was tuned from (edge_node/adapt.py)
        self._variants: dict[str, dict] = dict(store.get_json(VARIANTS_KEY, {}) or {})
        self._served_variant: dict[str, str] = {}  # name -> the variant version served
        self._permanent: dict[str, str] = {}  # sha256 -> reason (not retried)
        self._reinstall: dict[str, threading.Event] = {}  # name -> set when its pass is over
        self._relocate: dict[str, threading.Event] = {}  # name -> set when its pass is over
        #: card id -> True when discovery no longer lists it (set by the accelerator
        #: health check): a worker that died on such a card is not a crash loop
        self.card_gone: Callable[[str], bool] = lambda _card: False
        #: a version becomes an app's *last known good* once it served this long
        #: with no worker restart; a crash loop of a later version rolls back to it
        self.stable_s = stable_s
        self._last_good: dict[str, dict] = dict(store.get_json(LAST_GOOD_KEY, {}) or {})
        self._crash_looped: dict[str, str] = dict(store.get_json(CRASH_LOOPED_KEY, {}) or {})
        self._ready_at: dict[str, tuple[str, float, int]] = {}  # name -> (key, t, restarts)
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
            same_epoch = self.desired is not None and desired.epoch == self.desired.epoch
            if same_epoch and desired.revision < self.desired.revision:
                logger.info("ignoring stale desired revision %d < %d",
                            desired.revision, self.desired.revision)
                return
            changed = self.desired is None or desired.revision != self.desired.revision \
                or desired.apps != self.desired.apps
            training_changed = self.desired is None or desired.training != self.desired.training
            self.desired = desired
        self.store.put_json(DESIRED_KEY, desired.model_dump())
        self._hook(self.on_desired, desired)
        if training_changed:
            self._apply_training(desired.training)
        if changed:
            self._permanent.clear()
            wanted = {a.sha256 for a in desired.apps}
            if any(sha not in wanted for sha in self._crash_looped):
                # a version is tried again only once the cloud stopped asking for it
                with self._lock:
                    self._crash_looped = {k: v for k, v in self._crash_looped.items()
                                          if k in wanted}
                self.store.put_json(CRASH_LOOPED_KEY, self._crash_looped)
            self._cancel.set()
            self._wake.put("desired")

    def _apply_training(self, training: schemas.TrainingSchedule | None) -> None:
        self._hook(self.on_training, training)

    @staticmethod
    def _hook(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception:  # a bad hook must not stop app reconciliation
            logger.exception("a desired-state hook (%s) failed", getattr(fn, "__name__", fn))

    def count_rejected(self, reason: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        logger.warning("rejected (%s): %s", reason, detail)
        self.on_change()

    # -- site variants (models fine-tuned on this node) ---------------------------
    def set_variant(self, name: str, variant: dict | None) -> None:
        """Serve ``variant`` (``{"base_sha256", "app_dir", "version", "sha256",
        "run_id"}``) instead of the package's model of ``name`` while the desired
        version is its base; None goes back to the package's model (a rollback).
        Persisted; the switch happens on the reconciler's thread, new worker first."""
        with self._lock:
            if variant is None:
                self._variants.pop(name, None)
            else:
                self._variants[name] = dict(variant)
            self.store.put_json(VARIANTS_KEY, self._variants)
        self._wake.put("variant")

    def variant(self, name: str) -> dict | None:
        with self._lock:
            v = self._variants.get(name)
            return dict(v) if v else None

    def serving(self, name: str) -> dict | None:
        """What serves ``name`` now: ``{"sha256", "key", "variant"}`` or None."""
        with self._lock:
            run = self._running.get(name)
            if run is None:
                return None
            return {"sha256": run[0], "key": run[1],
                    "variant": self._served_variant.get(name)}

    def _active_variant(self, ref: schemas.AppRef) -> dict | None:
        with self._lock:
            v = self._variants.get(ref.name)
        if not v or v.get("base_sha256") != ref.sha256:
            return None  # none, or tuned from another version: the package's model serves
        if not (Path(v["app_dir"]) / ".complete").exists():
            logger.error("site variant %s of %s is gone from %s; serving the package's model",
                         v.get("version"), ref.name, v.get("app_dir"))
            self.set_variant(ref.name, None)
            self.on_event("variant_dropped", "error", ref.name,
                          {"version": v.get("version"), "reason": "files missing"})
            return None
        return v

    def reinstall(self, name: str) -> threading.Event:
        """Install ``name``'s running version again, on the reconciler's thread:
        its package is verified again (fetched again first when it is no longer
        in the blob cache), unpacked afresh unless its app dir is complete, and
        a new worker started in place of the running one (same client). The
        event is set when that pass is over, whether the app ended ready or
        failed (see :meth:`reports`)."""
        with self._lock:
            ev = self._reinstall.setdefault(name, threading.Event())
        self._wake.put("reinstall")
        return ev

    def relocate(self, names: list[str]) -> threading.Event:
        """Place ``names`` afresh (preference order, lost cards left out) and restart
        each one's worker with its new slice's settings, on the reconciler's thread
        (same worker key and client). The event is set when that pass is over; an
        app not in the desired state, or whose slice did not change, is left alone."""
        done = threading.Event()
        if not names:
            done.set()
            return done
        with self._lock:
            evs = [self._relocate.setdefault(n, threading.Event()) for n in names]
        threading.Thread(target=lambda: ([e.wait() for e in evs], done.set()),
                         name="relocate-wait", daemon=True).start()
        self._wake.put("relocate")
        return done

    def _card_gone(self, card: str) -> bool:
        try:
            return bool(self.card_gone(card))
        except Exception:  # noqa: BLE001 - discovery failing is not a verdict
            logger.exception("cannot tell whether card %s is gone", card)
            return False

    def _on_lost_card(self, name: str) -> bool:
        sl = self.placement.get(name)
        return sl is not None and sl.card in self.placement.lost()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        saved = self.store.get_json(DESIRED_KEY)
        if saved and self.desired is None:
            try:
                self.desired = schemas.DesiredState.model_validate(saved)
                logger.info("resuming last desired state, revision %d", self.desired.revision)
            except ValueError:
                logger.warning("stored desired state unreadable; waiting for the cloud")
        if self.desired is not None:  # offline restart: what the cloud last said
            self._hook(self.on_desired, self.desired)
            self._apply_training(self.desired.training)
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
                self._wake.get(timeout=retry_in or self.check_interval)
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
        """One pass towards the desired state; True when something must be retried."""
        with self._lock:
            desired = self.desired
        if desired is None:
            self.registry.loaded = True
            return False
        transient = False
        wanted = {a.name: a for a in desired.apps}
        for name in list(self._running):  # removals first: they free cores for the rest
            if name not in wanted:
                self._remove(name)
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
                    self._permanent[ref.sha256] = str(err)
                    self.count_rejected(err.reason, f"{ref.name} {ref.version}: {err.detail}")
                    self.on_event("app_failed", "error", ref.name,
                                  {"version": ref.version, "reason": err.reason,
                                   "detail": err.detail[:500]})
            except Exception as err:  # noqa: BLE001 - one app must not stall the others
                logger.exception("installing %s %s failed", ref.name, ref.version)
                self._set(ref, "failed", error=f"internal: {err}"[:500])
                transient = True
            finally:
                with self._lock:
                    done = self._reinstall.pop(ref.name, None)
                    moved = self._relocate.pop(ref.name, None)
                for ev in (done, moved):
                    if ev is not None:
                        ev.set()
        with self._lock:
            gone = [n for n in self._reports if n not in wanted]
            for name in gone:
                del self._reports[name]
            stale = [n for n in self._relocate if n not in wanted]
            unasked = [self._relocate.pop(n) for n in stale]
        for ev in unasked:
            ev.set()
        if gone:
            self.on_change()
        self.registry.loaded = True
        return transient

    def _set(self, ref: schemas.AppRef, status: str, error: str | None = None,
             progress: float | None = None) -> None:
        with self._lock:
            self._reports[ref.name] = schemas.AppReport(
                name=ref.name, version=ref.version, sha256=ref.sha256, status=status,
                error=error, progress=progress, variant=self._served_variant.get(ref.name))
        self.on_change()

    def _ensure(self, ref: schemas.AppRef) -> None:
        running = self._running.get(ref.name)
        variant = self._active_variant(ref)
        want_key = f"{ref.name}@{(variant['sha256'] if variant else ref.sha256)[:12]}"
        with self._lock:
            again = ref.name in self._reinstall  # reinstall(): do it all again
            refit = ref.name in self._relocate  # relocate(): placed afresh
        if running and self._on_lost_card(ref.name):
            refit = True  # its card is gone: placed afresh (not a crash loop to roll back)
        if running and running[0] == ref.sha256 and running[1] == want_key and refit:
            if self._move(ref, running[1], variant):
                return
            again = True  # its app dir is gone: the whole way, placed afresh
        if running and running[0] == ref.sha256 and running[1] == want_key and not again:
            if self.supervisor.client(running[1]) is not None:
                rep = self._reports.get(ref.name)
                if rep is None or rep.sha256 != ref.sha256 or rep.status != "ready":
                    self._set(ref, "ready")  # e.g. the cloud went back to what serves
                self._note_stable(ref, running[1])
                return  # serving (or being restarted by the supervisor)
            app = self.registry.get(ref.name)
            if app is not None:
                app.ready = False  # /v2 answers 503, not a hang, until it is back
            last = self.supervisor.status().get(running[1], {}).get("last_error")
            self.on_event("worker_failed", "error", ref.name, {"error": str(last)[:500]})
            sl = self.placement.get(ref.name)
            if sl is not None and sl.kind != "cpu" and self._card_gone(sl.card):
                # its card is gone, not its version: no rollback, no restart there; the
                # accelerator check marks the card lost and the app is placed afresh
                self._set(ref, "failed", error=f"card {sl.card} is gone; {ref.name} waits "
                                               "to be placed on another card")
                return
            if self._roll_back_crash_loop(ref, str(last)):
                return
            logger.error("worker of %s gave up (%s); starting it afresh", ref.name, last)
        if ref.sha256 in self._crash_looped:
            self._keep_last_good_serving(ref)
            self._set(ref, "failed", error=self._crash_looped[ref.sha256])
            return  # not retried until the desired state names another version
        if ref.sha256 in self._permanent:
            self._set(ref, "failed", error=self._permanent[ref.sha256])
            return  # counted and reported once; retried when the desired state changes
        path = self.blobs_dir / ref.sha256
        if not path.exists():
            self._fetch(ref)
        self._set(ref, "verifying")
        app_dir = self._verify_and_unpack(ref, path)
        self._set(ref, "loading")
        if variant is not None:
            self._load(ref, Path(variant["app_dir"]), key=want_key, version=variant["version"],
                       refit=refit)
        else:
            self._load(ref, app_dir, refit=refit)
        with self._lock:
            if variant is not None:
                self._served_variant[ref.name] = variant["version"]
            else:
                self._served_variant.pop(ref.name, None)
        self._set(ref, "ready")
        self._ready_at.pop(ref.name, None)  # the stability clock starts now
        self._gc(ref.name)
        self.on_event("app_ready", "info", ref.name, {
            "version": ref.version, "sha256": ref.sha256,
            "variant": variant["version"] if variant else None})

    def _move(self, ref: schemas.AppRef, key: str, variant: dict | None) -> bool:
        """Place a running app afresh; a new slice: its worker restarted with the new
        slice's settings (same key, same client). True when done here (moved, or
        its slice unchanged and its worker serving); an app that fits nowhere while
        its card is lost is stopped, released and raises :class:`InstallError`."""
        old = self.placement.get(ref.name)
        app_dir = Path(variant["app_dir"]) if variant else \
            self.apps_dir / ref.name / ref.sha256[:16]
        if not (app_dir / ".complete").exists():
            return False  # the full path below unpacks it again and loads it
        try:
            manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
            req = SliceRequest.from_manifest(ref.name, manifest.resources, self._override(ref))
            sl = self.placement.place(req, refit=True)
        except PlacementError as err:
            if old is not None and old.card not in self.placement.lost():
                logger.info("%s stays on %s: %s", ref.name, old.card, err)
                return True  # no room elsewhere: it goes on serving where it is
            if old is None:
                raise InstallError("placement_refused", str(err), transient=True) from err
            # its card is gone and it fits nowhere else: not left half deployed
            self._running.pop(ref.name, None)
            app = self.registry.get(ref.name)
            if app is not None:
                app.ready = False  # /v2 answers 503 until it is placed again
            self.supervisor.stop(key)
            self.placement.release(ref.name)
            why = (f"card {old.card} is lost and {ref.name} fits on no other card: {err}")
            self.on_event("app_unplaced", "error", ref.name,
                          {"version": ref.version, "card": old.card, "reason": why[:500]})
            raise InstallError("placement_refused", why, transient=True) from err
        except (OSError, ValueError, PackageError):
            return False
        if old is not None and sl == old and self.supervisor.client(key) is not None:
            return True  # nothing to move
        self._set(ref, "loading")
        try:
            self.supervisor.start(key, app_dir, settings=worker_settings(sl))
        except Exception as err:  # noqa: BLE001 - reported like a failed start
            raise InstallError("worker_start_failed", str(err)[-500:], transient=True) from err
        served = self.registry.get(ref.name)
        if served is not None:  # same client; the batching policy of the new card's kind
            self.registry.add(dataclasses.replace(
                served, ready=True,
                batch=policy_for(manifest.batching, sl.kind, self.batching.get(ref.name))))
        self._set(ref, "ready")
        logger.warning("app %s moved from %s to %s (%s)", ref.name,
                       old.card if old else "nowhere", sl.card, sl.describe())
        self.on_event("app_moved", "warning", ref.name,
                      {"version": ref.version, "from_card": old.card if old else None,
                       "to_card": sl.card, "slice": sl.to_dict()})
        return True

    # -- crash loops: back to the last known good version ---------------------
    def _note_stable(self, ref: schemas.AppRef, key: str) -> None:
        """A version that served ``stable_s`` with no worker restart becomes the app's
        last known good (not a site variant: its package is the cloud's)."""
        if ref.name in self._served_variant:
            return
        restarts = int(self.supervisor.status().get(key, {}).get("restarts", 0))
        seen = self._ready_at.get(ref.name)
        now = time.monotonic()
        if seen is None or seen[0] != key or seen[2] != restarts:
            self._ready_at[ref.name] = (key, now, restarts)
            return
        if now - seen[1] < self.stable_s or \
                self._last_good.get(ref.name, {}).get("sha256") == ref.sha256:
            return
        self._last_good[ref.name] = {
            "sha256": ref.sha256, "version": ref.version, "size": ref.size,
            "app_dir": str(self.apps_dir / ref.name / ref.sha256[:16])}
        self.store.put_json(LAST_GOOD_KEY, self._last_good)
        logger.info("%s %s is now the last known good version", ref.name, ref.version)

    def _roll_back_crash_loop(self, ref: schemas.AppRef, last_error: str) -> bool:
        """The supervisor used up ``ref``'s restart budget: serve the app's last known
        good version instead, mark ``ref`` crash-looped (reported failed, with why,
        not retried until the desired state changes) and raise an alarm. False when
        there is no other version to go back to (then it is started afresh)."""
        lg = self._last_good.get(ref.name)
        if not lg or lg["sha256"] == ref.sha256:
            return False
        why = (f"crash loop: the worker of {ref.name} {ref.version} used up its restart "
               f"budget ({last_error[:200]}); rolled back to {lg['version']}, the last "
               "known good version")
        try:
            self._serve_last_good(ref, lg)
        except (InstallError, OSError) as err:
            logger.error("%s: cannot roll back to %s: %s", ref.name, lg["version"], err)
            return False
        with self._lock:
            self._crash_looped[ref.sha256] = why
        self.store.put_json(CRASH_LOOPED_KEY, self._crash_looped)
        self.count_rejected("crash_loop", why)
        logger.error("%s", why)
        self.on_event("app_rolled_back", "error", ref.name, {
            "version": ref.version, "to_version": lg["version"], "reason": "crash_loop",
            "detail": why[:500]})
        self._set(ref, "failed", error=why)
        return True

    def _serve_last_good(self, ref: schemas.AppRef, lg: dict) -> None:
        good = ref.model_copy(update={"version": lg["version"], "sha256": lg["sha256"],
                                      "size": lg.get("size") or ref.size})
        app_dir = Path(lg["app_dir"])
        if not (app_dir / ".complete").exists():  # unpacked again from the kept package
            app_dir = self._verify_and_unpack(good, self.blobs_dir / lg["sha256"])
        self._load(good, app_dir)

    def _keep_last_good_serving(self, ref: schemas.AppRef) -> None:
        """After a crash-loop rollback (also after a restart of the agent), the last
        known good version serves; restart it if its own worker gave up or if nothing
        serves the app."""
        lg = self._last_good.get(ref.name)
        running = self._running.get(ref.name)
        if not lg:
            return
        if running and running[0] == lg["sha256"] and \
                self.supervisor.client(running[1]) is not None:
            return
        try:
            self._serve_last_good(ref, lg)
        except (InstallError, OSError) as err:
            logger.error("%s: the last known good %s cannot serve: %s", ref.name,
                         lg["version"], err)

    def _fetch(self, ref: schemas.AppRef) -> None:
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
            if err.reason == "hash_mismatch":  # a damaged transfer: fetch again, a few times
                self._mismatches[ref.sha256] += 1
                transient = self._mismatches[ref.sha256] < 3
            else:
                transient = err.reason not in ("unknown_blob", "size_mismatch")
            raise InstallError(f"fetch_{err.reason}", str(err), transient=transient) from err
        except CloudSyncError as err:
            raise InstallError("fetch_failed", str(err), transient=True) from err

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
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in pkg.members.items():
                _write_synced(tmp / name, data)
            _write_synced(tmp / ".complete", ref.sha256.encode())
            _fsync_dir(tmp)
            shutil.rmtree(app_dir, ignore_errors=True)
            tmp.rename(app_dir)
            _fsync_dir(app_dir.parent)
        self.store.record_installed(ref.name, ref.version, ref.sha256, app_dir)
        return app_dir

    def _override(self, ref: schemas.AppRef) -> dict | None:
        """The site's override, then the cloud's on top (the cloud wins)."""
        merged = dict(self.overrides.get(ref.name) or {})
        if ref.resources is not None:
            merged.update(ref.resources.model_dump(exclude_none=True))
        return merged or None

    def _load(self, ref: schemas.AppRef, app_dir: Path, key: str | None = None,
              version: str | None = None, refit: bool = False) -> None:
        """Start a worker for ``app_dir`` and swap it in; ``key``/``version``
        name a site variant (a fine-tuned model beside the package's)."""
        key = key or f"{ref.name}@{ref.sha256[:12]}"
        version = version or ref.version
        try:
            manifest = load_manifest(json.loads((app_dir / "manifest.json").read_text()))
        except (OSError, ValueError, PackageError) as err:  # a damaged unpack
            shutil.rmtree(app_dir, ignore_errors=True)  # unpacked again next time
            raise InstallError("unpack_damaged", str(err)[-500:], transient=True) from err
        fresh = ref.name not in self._running
        try:
            sl = self.placement.place(
                SliceRequest.from_manifest(ref.name, manifest.resources, self._override(ref)),
                refit=refit)
        except PlacementError as err:  # may fit once another app goes: retried
            raise InstallError("placement_refused", str(err), transient=True) from err
        try:
            client = self.supervisor.start(key, app_dir, settings=worker_settings(sl))
        except Exception as err:  # WorkerStartError, a busy box
            if fresh:
                self.placement.release(ref.name)  # a dead app holds no cores
            # exit code 2: the model or the provider is wrong -- not worth retrying
            permanent = "exited with code 2" in str(getattr(err, "reason", ""))
            if not permanent:
                shutil.rmtree(app_dir, ignore_errors=True)
            raise InstallError("worker_start_failed", str(err)[-500:],
                               transient=not permanent) from err
        labels = None
        pp = manifest.postprocess
        if pp and pp.labels_file and (app_dir / pp.labels_file).exists():
            labels = [ln.strip() for ln in (app_dir / pp.labels_file).read_text().splitlines()
                      if ln.strip()]
        batch = policy_for(manifest.batching, sl.kind, self.batching.get(ref.name))
        self.registry.add(ServedApp(name=ref.name, version=version, sha256=ref.sha256,
                                    manifest=manifest, client=client, labels=labels, ready=True,
                                    batch=batch))
        old = self._running.get(ref.name)
        self._running[ref.name] = (ref.sha256, key)
        if old and old[1] != key:
            self.supervisor.stop(old[1])
        logger.info("app %s %s ready (worker %s)", ref.name, version, key)

    def _gc(self, name: str) -> None:
        """Keep the running version and the one before it (for a rollback) of
        ``name``; delete older packages and unpacked dirs, so disk stays bounded."""
        running = self._running.get(name, ("", ""))[0]
        rows = sorted((r for r in self.store.all_installed() if r["name"] == name),
                      key=lambda r: r["installed_at"], reverse=True)
        others = [r["sha256"] for r in rows if r["sha256"] != running]
        keep = {running, *others[:max(0, self.keep_versions - 1)],
                self._last_good.get(name, {}).get("sha256")}  # what a crash loop goes back to
        for r in rows:
            if r["sha256"] in keep:
                continue
            (self.blobs_dir / r["sha256"]).unlink(missing_ok=True)
            shutil.rmtree(r["app_dir"], ignore_errors=True)
            self.store.forget_installed(r["sha256"])
            logger.info("removed old version %s of %s (%s)", r["version"], name, r["sha256"][:12])

    def _remove(self, name: str) -> None:
        sha, key = self._running.pop(name)
        self._served_variant.pop(name, None)
        self.registry.remove(name)
        self.supervisor.stop(key)
        self.placement.release(name)
        logger.info("app %s removed (was %s)", name, sha[:12])
        self.on_event("app_removed", "info", name, {"sha256": sha})
        self._gc(name)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
