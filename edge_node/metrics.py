"""Prometheus metrics of the node, at ``GET /metrics``.

Collected at scrape time from the parts' own counters (a custom collector), so
the hot path pays nothing for them. Names are ``aidc_*``; labels ``app``,
``card``, ``worker``, ``reason``, ``rule`` (alarms), ``kind`` and ``check`` (faults).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def proc_usage(pid: int) -> tuple[int, float] | None:
    """(RSS bytes, CPU seconds) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        return rss, cpu
    except (OSError, ValueError, IndexError):
        return None


class NodeCollector:
    """Reads a snapshot from the agent at every scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.started = time.time()

    def collect(self) -> Iterable:
        s = self.snapshot()
        up = GaugeMetricFamily("aidc_up", "1 while the agent runs", labels=["node"])
        up.add_metric([s["node_id"]], 1)
        yield up
        yield _gauge("aidc_mqtt_connected", "1 while connected to the broker",
                     [([], 1.0 if s["connected"] else 0.0)])
        usage = proc_usage(os.getpid())
        if usage:
            yield _gauge("aidc_agent_rss_bytes", "resident memory of the management plane",
                         [([], usage[0])])
            yield _counter("aidc_agent_cpu_seconds", "CPU time of the management plane",
                           [([], usage[1])])
        yield _gauge("aidc_agent_max_rss_bytes", "peak resident memory of the agent",
                     [([], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)])

        apps = s.get("apps", [])
        yield _gauge("aidc_app_ready", "1 when the app serves", [
            ([a["name"], a["version"]], 1.0 if a["status"] == "ready" else 0.0) for a in apps
        ], labels=["app", "version"])
        for key, name, help_ in (("requests", "aidc_app_requests", "inference requests"),
                                 ("errors", "aidc_app_request_errors", "failed requests")):
            rows = [([app], float(v.get(key, 0))) for app, v in s.get("serving", {}).items()]
            yield _counter(name, help_, rows, labels=["app"])

        hist = HistogramMetricFamily("aidc_app_request_seconds",
                                     "inference request latency at the node's HTTP front",
                                     labels=["app"])
        for app, v in s.get("serving", {}).items():
            buckets = v.get("latency_seconds_buckets")
            if buckets:
                hist.add_metric([app], [(_le(k), float(c)) for k, c in buckets.items()],
                                float(v.get("latency_seconds_sum", 0.0)))
        yield hist

        batching = s.get("batching", {})
        yield _counter("aidc_app_batch_calls", "worker calls made by dynamic batching",
                       [([a], float(b.get("calls", 0))) for a, b in batching.items()],
                       labels=["app"])
        yield _counter("aidc_app_batch_rows", "rows (batch items) sent in those calls",
                       [([a], float(b.get("rows", 0))) for a, b in batching.items()],
                       labels=["app"])
        yield _gauge("aidc_app_batch_queued", "requests waiting to join a batch",
                     [([a], float(b.get("queued", 0))) for a, b in batching.items()],
                     labels=["app"])

        workers = s.get("workers", {})
        yield _counter("aidc_worker_restarts", "worker restarts",
                       [([k], float(w.get("restarts", 0))) for k, w in workers.items()],
                       labels=["worker"])
        rss, cpu = [], []
        for key, w in workers.items():
            u = proc_usage(w["pid"]) if w.get("pid") else None
            if u:
                rss.append(([key], float(u[0])))
                cpu.append(([key], u[1]))
        yield _gauge("aidc_worker_rss_bytes", "resident memory of a model worker", rss,
                     labels=["worker"])
        yield _counter("aidc_worker_cpu_seconds", "CPU time of a model worker", cpu,
                       labels=["worker"])

        ob = s.get("outbox", {})
        yield _gauge("aidc_outbox_pending", "messages waiting for the cloud's ack",
                     [([], float(ob.get("pending", 0)))])
        for k in ("sent", "resent", "acked", "rejected"):
            yield _counter(f"aidc_outbox_{k}", f"outbox messages {k}", [([], float(ob.get(k, 0)))])
        cap = s.get("capture", {})
        yield _counter("aidc_results", "results recorded", [([], float(cap.get("results", 0)))])
        yield _counter("aidc_samples_kept", "hard examples kept",
                       [([], float(cap.get("samples_kept", 0)))])
        yield _counter("aidc_sample_ops", "what happened to hard examples: kept, evicted, "
                       "quota_full, labelled, kept_home, shared_full, shared_metadata, ...",
                       [([k.removeprefix("samples_")], float(v)) for k, v in cap.items()
                        if k.startswith("samples_")], labels=["op"])
        yield _gauge("aidc_samples_stored", "samples on the node's disk, by app and state",
                     [([app, k], float(c.get(k, 0))) for app, c in s.get("samples", {}).items()
                      for k in ("kept", "labelled", "unlabelled", "heldout")],
                     labels=["app", "state"])
        drops = [([k], float(v)) for k, v in cap.items()
                 if k.endswith("dropped") or k.endswith("rate_limited")]
        yield _counter("aidc_capture_dropped", "observations not kept, by reason", drops,
                       labels=["reason"])
        yield _counter("aidc_rejected", "rejected messages and packages, by reason",
                       [([k], float(v)) for k, v in s.get("rejected", {}).items()],
                       labels=["reason"])
        streams = s.get("streams", {})
        yield _gauge("aidc_stream_up", "1 while a camera stream delivers frames",
                     [([sid, st.get("app", "")], 1.0 if st.get("state") == "online" else 0.0)
                      for sid, st in streams.items()], labels=["stream", "app"])
        buckets = ("captured", "processed", "failed", "dropped_capture", "dropped_inflight",
                   "dropped_torn", "dropped_stopped", "lost", "unexplained")
        yield _counter("aidc_stream_frames", "camera frames by what became of them",
                       [([sid, b], float(st.get(b, 0))) for sid, st in streams.items()
                        for b in buckets], labels=["stream", "bucket"])
        alarms = s.get("alarms", {})
        yield _gauge("aidc_alarms_open", "alarms open or acknowledged, by rule",
                     [([r], float(n)) for r, n in alarms.get("open", {}).items()],
                     labels=["rule"])
        yield _counter("aidc_alarms_raised", "alarms raised since the agent started, by rule",
                       [([r], float(n)) for r, n in alarms.get("raised", {}).items()],
                       labels=["rule"])
        yield _counter("aidc_alarms_false", "alarms marked false (each became a sample), "
                       "by rule", [([r], float(n)) for r, n in alarms.get("false", {}).items()],
                       labels=["rule"])
        kinds = (s.get("faults") or {}).get("kinds", {})  # the fault journal (docs/faults.md)
        for k, help_ in (("detected", "fault episodes detected, by kind"),
                         ("healed", "fault episodes healed, by kind"),
                         ("unhealed", "remedies that did not take, by kind")):
            yield _counter(f"aidc_faults_{k}", help_,
                           [([kind], float(v.get(k, 0))) for kind, v in kinds.items()],
                           labels=["kind"])
        yield _gauge("aidc_fault_mean_time_to_heal_seconds", "mean time to heal, by kind",
                     [([kind], float(v["mean_time_to_heal_s"])) for kind, v in kinds.items()
                      if v.get("mean_time_to_heal_s") is not None], labels=["kind"])
        yield _gauge("aidc_faults_open", "faults open now, by check",
                     [([c], 1.0) for c in ((s.get("faults") or {}).get("open") or {})],
                     labels=["check"])
        cards = s.get("cards", [])
        yield _gauge("aidc_card_slices", "slices allocated on a card",
                     [([c["id"]], float(len((c.get("allocation") or {}).get("slices", []))))
                      for c in cards], labels=["card"])
        for extra in s.get("extra_metrics", []):
            yield from extra()


def _le(bound) -> str:
    """A bucket's upper bound as Prometheus writes it (``+Inf`` for infinity)."""
    f = float(bound)
    return "+Inf" if f == float("inf") else repr(f)


def _gauge(name: str, help_: str, rows, labels: list[str] | None = None):
    g = GaugeMetricFamily(name, help_, labels=labels or [])
    for lv, v in rows:
        g.add_metric(lv, v)
    return g


def _counter(name: str, help_: str, rows, labels: list[str] | None = None):
    c = CounterMetricFamily(name, help_, labels=labels or [])
    for lv, v in rows:
        c.add_metric(lv, v)
    return c


def make_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(snapshot))
    return reg


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
