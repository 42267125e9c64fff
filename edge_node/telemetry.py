"""Learning telemetry: how each app does on this site, sent to the cloud.

Every ``interval_s`` (and on demand) the node builds one
:class:`~cloud_sync.schemas.Telemetry` message: per app, the served version
(and site variant), its accuracy on the samples a technician labelled (the
field accuracy: prediction vs label, for the version now served), the samples
kept / labelled / held out / shared by upload level, the fine-tune runs by
outcome, and the inference requests, errors and p95 latency of the interval
(what the AppStore's rollout health gates read). It goes out on ``telemetry`` at QoS 0, not retained (the next one
replaces a lost one); the AppStore keeps the series. Locally,
``GET /api/v1/telemetry`` adds the accuracy per version and day.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from cloud_sync import schemas

logger = logging.getLogger(__name__)


class Telemetry:
    def __init__(self, *, node_id: str, store: Any, registry: Any, reconciler: Any,
                 publish: Callable[[bytes], bool], interval_s: float = 60.0,
                 serving: Callable[[], dict[str, dict]] | None = None) -> None:
        self.node_id, self.store, self.registry = node_id, store, registry
        self.reconciler, self.publish, self.interval_s = reconciler, publish, interval_s
        #: the HTTP front's per-app counters (V2Service.stats); the interval figures
        #: are differences from the snapshot the previous message was built from
        self.serving = serving
        self._last: dict[str, dict] = {}
        self._versions: dict[str, str] = {}  # app -> served version of the last message
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _intervals(self) -> dict[str, dict[str, Any]]:
        """Per app: requests, errors and p95 latency (ms) since the previous call."""
        if self.serving is None:
            return {}
        with self._lock:
            now = self.serving()
            last, self._last = self._last, now
        out = {}
        for app, cur in now.items():
            prev = last.get(app, {})
            if cur.get("requests", 0) < prev.get("requests", 0):
                prev = {}  # counters restarted
            buckets = cur.get("latency_seconds_buckets", {})
            before = prev.get("latency_seconds_buckets", {})
            delta = [(float(le), n - before.get(le, 0)) for le, n in buckets.items()]
            total = delta[-1][1] if delta else 0
            p95 = None
            if total > 0:
                le = next(le for le, n in delta if n >= 0.95 * total)
                p95 = None if le == float("inf") else round(le * 1000, 3)
            out[app] = {"requests": cur.get("requests", 0) - prev.get("requests", 0),
                        "errors": cur.get("errors", 0) - prev.get("errors", 0),
                        "latency_p95_ms": p95}
        return out

    def message(self) -> schemas.Telemetry:
        serving = self._intervals()
        counts = self.store.sample_counts()
        acc = self.store.field_accuracy(days=3650)
        runs: dict[str, Counter] = {}
        for r in self.store.runs(limit=10000):
            runs.setdefault(r["app"], Counter())[r["state"]] += 1
        apps: dict[str, schemas.AppTelemetry] = {}
        for name in self.registry.names():
            served = self.registry.get(name)
            if served is None:
                continue
            mine = [a for a in acc if a["app"] == name and a["version"] == served.version]
            n = sum(a["n"] for a in mine)
            ok = sum(a["correct"] or 0 for a in mine)
            c = counts.get(name, {})
            now = self.reconciler.serving(name) or {}
            fig = serving.get(name, {})
            if self.serving is not None:
                if self._versions.get(name, served.version) != served.version:
                    # the interval straddles a version switch: its requests cannot be
                    # told apart, so none are reported (the agent sends a message at
                    # each switch, so this interval is short)
                    fig = {"requests": 0, "errors": 0, "latency_p95_ms": None}
                self._versions[name] = served.version
            apps[name] = schemas.AppTelemetry(
                version=served.version, variant=now.get("variant"), labelled=n, correct=ok,
                accuracy=ok / n if n else None, samples_kept=c.get("kept", 0),
                samples_labelled=c.get("labelled", 0), samples_heldout=c.get("heldout", 0),
                shared_full=c.get("shared_full", 0), shared_metadata=c.get("shared_metadata", 0),
                shared_none=c.get("shared_none", 0),
                shared_features=c.get("shared_features", 0), finetunes=dict(runs.get(name, {})),
                **fig)
        return schemas.Telemetry(node_id=self.node_id, interval_s=self.interval_s, apps=apps)

    def local(self) -> dict[str, Any]:
        """The message plus the accuracy per app, version and day (local API); the
        serving figures are those of the last message sent (reading does not
        reset the interval)."""
        saved = self.serving
        self.serving = None
        try:
            doc = self.message().model_dump()
        finally:
            self.serving = saved
        return {**doc, "by_day": self.store.field_accuracy(days=30), "sent": dict(self.stats)}

    def send(self) -> bool:
        try:
            ok = self.publish(self.message().to_bytes())
        except Exception:  # noqa: BLE001 - telemetry must never hurt the node
            logger.exception("telemetry")
            ok = False
        self.stats["sent" if ok else "unsent"] += 1
        return ok

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.send()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
