"""The edge agent: wires the node's parts, starts them in order, stops them in reverse.

Nothing here does work of its own; each part owns one job:

- :class:`~edge_node.store.NodeStore` -- local SQLite (results, samples, twin)
- :class:`~cloud_sync.connection.MqttConnection` -- the link to the cloud
- :class:`~cloud_sync.outbox.Outbox` -- durable uplink, resent until acked
- :class:`~cloud_sync.blobs.BlobFetcher` -- packages in chunks over MQTT
- :class:`~edge_node.worker.supervisor.WorkerSupervisor` -- model processes
- :class:`~edge_node.reconciler.Reconciler` -- follows the desired state
- :class:`~edge_node.capture.Capture` -- results and hard examples
- :class:`~edge_node.alarms.Alarms` -- rules on camera results, alarms people handle
- :class:`~edge_node.reporter.Reporter` -- the retained reported state
- an event-loop HTTP server (uvloop + httptools) -- the v2 inference protocol; Flask for the local API, /metrics
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from flask import Flask

from cloud_sync import schemas
from cloud_sync.blobs import BlobFetcher
from cloud_sync.connection import MqttConnection, Will
from cloud_sync.errors import CloudSyncError
from cloud_sync.outbox import Outbox
from cloud_sync.topics import Topics

from . import __version__
from .api import make_local_blueprint
from .adapt import SiteLearning
from .alarms import Alarms
from .capture import Capture
from .telemetry import Telemetry
from .config import NodeConfig
from .httpd import serve
from .keys import trusted_keys
from .metrics import make_registry
from .inference_load import InferenceLoad
from .reconciler import Reconciler
from .remote import RemoteOps
from .resources import Placement, discover_cards
from .reporter import Reporter
from .scheduling.jobs import JobRegistry
from .scheduling.scheduler import Scheduler
from .serving.registry import AppRegistry, ServedApp
from .serving.v2 import make_v2_blueprint
from .store import NodeStore
from .systemd import Notifier, Watchdog
from .systemd import watchdog_interval as sd_watchdog_interval
from .ui import make_ui_blueprint
from . import hardex
from .labelling import Labeller
from .streams import StreamManager
from .streams.adapters import worker_classify
from .streams.stream import FrameCopy
from .worker.supervisor import WorkerSupervisor

logger = logging.getLogger(__name__)
#: seconds between learning-telemetry messages to the cloud (QoS 0)


class NodeAgent:
    def __init__(self, cfg: NodeConfig, config_path: Path | None = None,
                 config_overrides: dict | None = None,
                 startup_faults: list[dict] | None = None) -> None:
        self.cfg = cfg
        # systemd: READY, watchdog, STATUS (no-op elsewhere); taken out of the
        # environment so that worker processes do not inherit it
        self.sd = Notifier(os.environ.pop("NOTIFY_SOCKET", None))
        self.watchdog: Watchdog | None = None
        d = cfg.data_dir
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self._health_init(config_path, config_overrides, startup_faults)  # before node.db opens
        self.store = NodeStore(d / "node.db")
        avail = self.topics.availability(cfg.node_id)
        self.conn = MqttConnection(
            f"edge-{cfg.node_id}", cfg.mqtt.host, cfg.mqtt.port,
            will=Will(avail, schemas.Availability(status="offline").to_bytes()),
            online=Will(avail, schemas.Availability(status="online",
                                                    agent_version=__version__).to_bytes()),
            keepalive=cfg.mqtt.keepalive, username=cfg.mqtt.username, password=cfg.mqtt.password,
            tls=cfg.mqtt.tls_options(),
            ping_topic=self.topics.ping(cfg.node_id), ping_interval=cfg.mqtt.ping_interval_s,
            ping_timeout=cfg.mqtt.ping_timeout_s,
        )
        self.conn.set_offline_payload(schemas.Availability(status="offline").to_bytes())
        self.outbox = Outbox(d / "node.db", self.conn, self.topics.ack(cfg.node_id),
                             max_in_flight=cfg.outbox.max_in_flight,
                             min_retry=cfg.outbox.min_retry, max_retry=cfg.outbox.max_retry,
                             max_rows=cfg.outbox.max_rows)
        self.fetcher = BlobFetcher(self.conn, self.topics, cfg.node_id, d / "blobs",
                                   chunk_size=cfg.blob.chunk_size, window=cfg.blob.window,
                                   chunk_timeout=cfg.blob.chunk_timeout)
        # Unix socket paths must stay short (108 bytes): keep them out of data_dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="aidc-w-"))
        sup = cfg.supervision
        self.supervisor = WorkerSupervisor(  # memory quotas: the worker_memory health check
            self._run_dir, restart_budget=(sup.restart_budget, sup.restart_window_s),
            memory_poll=None)
        self.capture = Capture(self.store, self.outbox, self.topics.feedback(cfg.node_id),
                               d / "samples", cfg.feedback)
        # not "loaded" (so /v2/health/ready is 503) until the reconciler's first pass
        self.registry = AppRegistry(result_callback=self._on_result, loaded=False)
        self.reporter = Reporter(self.conn, self.topics.reported(cfg.node_id), self.reported_state)
        self.cards = discover_cards()
        self.placement = Placement(self.cards, reserve_mb=cfg.resources.reserve_mb,
                                   share_cores=cfg.resources.share_cores,
                                   gpu_context_mb=cfg.resources.gpu_context_mb)
        self.reconciler = Reconciler(
            node_id=cfg.node_id, store=self.store, fetcher=self.fetcher,
            supervisor=self.supervisor, registry=self.registry,
            trusted_keys=lambda: trusted_keys(cfg.trusted_keys, d / "trusted_keys"),
            blobs_dir=d / "blobs", apps_dir=d / "apps", on_change=self.reporter.changed,
            on_event=self.emit_event, on_training=self._on_training,
            on_desired=self._on_desired, placement=self.placement,
            overrides=cfg.resources.apps, batching=cfg.http.batching,
            stable_s=sup.stable_s, check_interval=sup.check_interval_s,
        )
        self.capture.features.bind(self.reconciler, self.store)  # upload level "features"
        self.jobs = JobRegistry(d / "node.db", d / "jobs")
        self.scheduler = Scheduler(
            self.jobs, cfg.scheduling,
            inference_load=InferenceLoad(self.supervisor.status, self.placement.snapshot),
            on_event=self._on_job_event)
        # scores travel with each frame's result: the hard-example policy needs them
        self.streams = StreamManager(worker_classify(self._stream_client, keep_scores=True),
                                     on_result=self._on_stream_result,
                                     on_status=self._on_stream_status, frames=True)
        self._stream_labels: dict[str, str | None] = {}
        self._policies: dict[tuple[str, str], hardex.Policy] = {}  # (app, sha256) ->
        self.labeller = Labeller(self.store, self.registry, self.capture, self.emit_event)
        self.alarms = Alarms(cfg.alarms, self.store, self.capture, self.labeller.classes,
                             self.emit_event, d / "alarms")
        self.adapt = SiteLearning(
            store=self.store, jobs=self.jobs, scheduler=self.scheduler,
            reconciler=self.reconciler, registry=self.registry, supervisor=self.supervisor,
            placement=self.placement, data_dir=d, emit_event=self.emit_event)
        self.telemetry = Telemetry(
            node_id=cfg.node_id, store=self.store, registry=self.registry,
            reconciler=self.reconciler, interval_s=cfg.telemetry_interval_s,
            publish=lambda b: self.conn.publish(self.topics.telemetry(cfg.node_id), b, qos=0),
            serving=lambda: self.v2_service.stats())
        self.flask = Flask("edge_node")
        self.flask.config["MAX_CONTENT_LENGTH"] = cfg.http.max_body_mb << 20
        v2 = make_v2_blueprint(self.registry, max_body_bytes=cfg.http.max_body_mb << 20,
                               server_version=__version__)
        self.v2_service = v2.v2_service
        self.flask.register_blueprint(v2)
        self.flask.register_blueprint(make_local_blueprint(self))
        self.flask.register_blueprint(make_ui_blueprint())
        self.metrics = make_registry(self.metrics_snapshot)
        self.remote = RemoteOps(self)  # the cloud's commands (docs/fleet.md, Remote operations)
        self.health = self._health_monitor()
        self._http = None
        self._http_thread: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        port = self._http.server_port if self._http else self.cfg.http.port
        return f"http://{self.cfg.http.host}:{port}"

    def _policy(self, app: ServedApp) -> hardex.Policy:
        """The app's hard-example policy (the manifest's, the site's overrides), cached."""
        key = (app.name, app.sha256)
        policy = self._policies.get(key)
        if policy is None:
            site = self.cfg.feedback.apps.get(app.name)
            policy = self._policies[key] = hardex.resolve(
                app.manifest.learning.hard_examples,
                site.model_dump(exclude_none=True) if site else None,
                self.cfg.feedback.threshold)
        return policy

    def _on_result(self, app: ServedApp, result: dict, tensor, image, source: str) -> None:
        self.capture.on_result(app.name, app.version, self._policy(app), result, tensor, image,
                               source)
        self.adapt.observe(app.name, result, tensor)

    def _on_job_event(self, type: str, data: dict) -> None:
        """A training job's event: to the cloud, and to site learning (its own thread:
        judging and starting a shadow worker must not hold up the scheduler)."""
        self.emit_event(type, severity="warning" if type == "job_failed" else "info", data=data)
        if type in ("job_done", "job_failed") and str(data.get("name", "")).startswith(
                "finetune-"):
            threading.Thread(target=self.adapt.on_job_event, args=(type, data),
                             name="finetune-verdict", daemon=True).start()

    def _on_desired(self, desired: schemas.DesiredState) -> None:
        self.capture.cloud_upload = {a.name: a.upload for a in desired.apps if a.upload}

    # -- time division -------------------------------------------------------
    def _on_training(self, training: schemas.TrainingSchedule | None) -> None:
        """The cloud's windows replace the config's; None gives the config's back."""
        sched = self.cfg.scheduling
        if training is None:
            windows, tz, source = sched.windows, sched.timezone, "config"
        else:
            windows, tz, source = training.windows, training.timezone, "cloud"
        wanted = {"source": source, "timezone": tz, "windows": [w.model_dump() for w in windows]}
        if wanted == self.scheduler.windows_in_force():
            return
        self.scheduler.set_windows(windows, tz, source)
        known = {c.id for c in self.cards}
        unknown = sorted({w.card for w in windows if w.card != "*" and w.card not in known})
        if unknown:
            logger.warning("training windows name cards this node lacks: %s (has %s)",
                           unknown, sorted(known))
        logger.info("training windows from %s: %d window(s), time zone %s", source,
                    len(windows), tz or "local")
        self.emit_event("training_windows", data={**wanted, "unknown_cards": unknown})
        self.reporter.changed()

    # -- camera streams ------------------------------------------------------
    def _stream_client(self, app: str):
        a = self.registry.get(app)
        return a.client if a is not None and a.ready else None

    def _on_stream_result(self, stream_id: str, app: str, result: dict, frame_ts: float,
                          frame: FrameCopy | None = None) -> None:
        """Every result is recorded (batched, off the frame path); a hard one keeps its
        frame (copied out of the stream's ring, only then); a sample of the frames goes
        to a fine-tune's shadow by reference; an event goes to the cloud when a
        stream's label changes, not for every frame."""
        served = self.registry.get(app)
        version = served.version if served else ""
        policy = self._policy(served) if served is not None else None
        self.capture.on_result(app, version, policy, result, None, None, source=stream_id,
                               frame=frame)
        self.alarms.observe(stream_id, app, version, result, frame_ts, frame)
        self.adapt.observe_frame(app, result, frame)  # a fine-tune's shadow, if any
        label = result.get("label")
        if self._stream_labels.get(stream_id) != label:
            self._stream_labels[stream_id] = label
            self.emit_event("stream_label", app=app, data={
                "stream_id": stream_id, "frame_ts": frame_ts, "label": label,
                "score": result.get("score")})

    def _on_stream_status(self, stream_id: str, status: dict) -> None:
        topic = self.topics.stream_status(self.cfg.node_id, stream_id)
        if status.get("state") == "removed":
            self.conn.publish(topic, b"", qos=1, retain=True)  # clears the retained status
            return
        fields = schemas.StreamStatus.model_fields
        msg = schemas.StreamStatus(node_id=self.cfg.node_id, stream_id=stream_id,
                                   **{k: v for k, v in status.items()
                                      if k in fields and k not in ("node_id", "stream_id", "ts")})
        self.conn.publish(topic, msg.to_bytes(), qos=1, retain=True)

    def _republish_streams(self) -> None:
        for sid, st in self.streams.stats().items():
            self._on_stream_status(sid, st)

    def emit_event(self, type: str, severity: str = "info", app: str | None = None,
                   data: dict | None = None, msg_id: str | None = None) -> bool:
        """A durable event: into the outbox (SQLite) first, then to the cloud; False
        when the outbox refused it (full: a long time offline), so callers that mark
        a fact's event sent leave it unsent and send it again later.
        ``msg_id``: the caller's, for an event that may be emitted again for the
        same fact (after a crash): the outbox and the cloud keep it once."""
        msg = schemas.EventMessage(msg_id=msg_id or schemas.new_msg_id(), type=type,
                                   severity=severity, app=app, data=data or {})
        queued = True
        try:
            self.outbox.put(self.topics.events(self.cfg.node_id), msg.to_bytes(), msg.msg_id,
                            kind="event")
        except CloudSyncError as err:
            logger.warning("event %s not queued: %s", type, err)
            queued = False
        if type == "app_ready" and getattr(self, "telemetry", None) is not None:
            # a new version serves: close the telemetry interval now, so the next one
            # (what rollout health gates read) holds this version's requests only
            threading.Thread(target=self.telemetry.send, name="telemetry-switch",
                             daemon=True).start()
        return queued

    def reported_state(self) -> schemas.ReportedState:
        desired = self.reconciler.desired
        return schemas.ReportedState(
            node_id=self.cfg.node_id, agent_version=__version__,
            desired_revision=desired.revision if desired else -1,
            apps=[a.model_copy(update={"upload": self.capture.upload_level(a.name)})
                  for a in self.reconciler.reports()],
            rejected=_copy(self.reconciler.rejected),
            http_url=self.http_url, outbox_pending=self.outbox.pending(),
            cards=self.cards_state(), training=self.scheduler.windows_in_force(),
        )

    def cards_state(self) -> list[dict]:
        alloc, lost = self.placement.snapshot(), self.placement.lost()
        return [{**c.to_dict(), "state": "lost" if c.id in lost else "ok",
                 "allocation": alloc.get(c.id)} for c in self.cards]

    def metrics_snapshot(self) -> dict:
        return {
            "node_id": self.cfg.node_id,
            "connected": self.conn.connected.is_set(),
            "apps": [a.model_dump() for a in self.reconciler.reports()],
            "workers": self.supervisor.status(),
            "outbox": self.outbox.stats(),
            "capture": _copy(self.capture.stats),
            "samples": self.store.sample_counts(),
            "rejected": _copy(self.reconciler.rejected),
            "serving": self.v2_service.stats(),
            "batching": self._http.batching_stats() if self._http else {},
            "streams": self.streams.stats(),
            "cards": self.cards_state(),
            "alarms": self.alarms.stats(),
            "faults": self.faults_block(),
        }

    def status(self) -> dict:
        return {
            "node_id": self.cfg.node_id,
            "version": __version__,
            "connected": self.conn.connected.is_set(),
            "http_url": self.http_url,
            "state": self.reported_state().model_dump(),
            "workers": self.supervisor.status(),
            "outbox": self.outbox.stats(),
            "capture": _copy(self.capture.stats),
            "samples": self.store.sample_counts(),
            "mqtt": _copy(self.conn.stats),
            "fetcher": _copy(self.fetcher.stats),
            "training": self.scheduler.status(),
            "batching": self._http.batching_stats() if self._http else {},
            "streams": self.streams.stats(),
            "alarms": self.alarms.stats(),
            "faults": self.faults_block(),
        }

    # -- health (issue 6, docs/faults.md) -----------------------------------------
    def _health_init(self, config_path: Path | None, overrides: dict | None,
                     startup_faults: list[dict] | None) -> None:
        """Before anything opens node.db: a damaged one is replaced by its last good
        copy (edge_node/health/db_integrity.py). Faults met at start are journalled
        and reported once the outbox exists (:meth:`_health_start`)."""
        from .health.db_integrity import guard_at_start

        self._config_path = Path(config_path).absolute() if config_path else None
        self._config_overrides = dict(overrides or {})
        self._startup_faults = [f for f in (startup_faults or []) if f]
        try:
            note = guard_at_start(self.cfg.data_dir / "node.db")
        except OSError as err:  # the restore itself failed: SQLite says the rest
            logger.error("node.db: could not restore the last good copy: %s", err)
            note = None
        if note is not None:
            self._startup_faults.append({**note, "fault": "db_corrupt",
                                         "check": "db_integrity"})

    def _health_checks(self) -> list:
        """Every health check of this node, in report order."""
        from . import selfcheck
        from .health.accelerator import AcceleratorCheck
        from .health.camera import CameraCheck
        from .health.config_guard import ConfigCheck
        from .health.db_integrity import DbIntegrityCheck
        from .health.disk_space import DiskSpaceCheck
        from .health.clock import ClockCheck
        from .health.memory_pressure import MemoryPressureCheck
        from .health.model_integrity import ModelIntegrityCheck
        from .health.worker_memory import WorkerMemoryCheck
        from .health.worker_stuck import WorkerStuckCheck

        d = self.cfg.data_dir
        return [
            selfcheck.BrokerCheck(self.conn.connected.is_set, self.cfg.mqtt.host,
                                  self.cfg.mqtt.port),
            selfcheck.WorkersCheck(self.supervisor.status),
            DiskSpaceCheck(d, running=lambda: {a.sha256 for a in self.reconciler.reports()}),
            DbIntegrityCheck(d / "node.db",
                             restart=self._restart_to_repair if self.sd.enabled else None),
            selfcheck.OutboxCheck(self.outbox.stats, self.outbox.pending,
                                  self.cfg.outbox.max_rows, retry_now=self.outbox.retry_now,
                                  connected=self.conn.connected.is_set),
            ConfigCheck(self._config_path, self._config_overrides),
            WorkerStuckCheck(self.supervisor),
            WorkerMemoryCheck(self.supervisor),
            ModelIntegrityCheck(self.reconciler),
            MemoryPressureCheck(scheduler=self.scheduler),
            ClockCheck(rearm={"scheduler": self.scheduler.wake,
                              "outbox": self.outbox.retry_now}),
            AcceleratorCheck(self.placement, self.reconciler, on_change=self.reporter.changed,
                             emit_event=self.emit_event),
            CameraCheck(self.streams),
        ]

    def _health_monitor(self):
        from .health import FaultJournal, Monitor

        self.fault_journal = FaultJournal(self.cfg.data_dir / "node.db")
        return Monitor(self._health_checks(), self.fault_journal, self.emit_event)

    def _health_start(self) -> None:
        """Faults met before the monitor ran are journalled with their events; then
        every journal row whose events never reached the outbox (this start's, and a
        previous run's killed between a row's commit and its event's) is sent, under
        the msg_ids it had (kept once)."""
        import time

        from .health.journal import emit_events

        for f in self._startup_faults:  # met before the monitor ran: journalled, reported
            kind, check = f.get("fault", "startup_fault"), f.get("check", "config")
            data = {k: v for k, v in f.items() if k not in ("fault", "check", "detail")}
            ev = {"fault": kind, "check": check, "detail": f.get("detail", ""),
                  "at_start": True, "data": data}
            events = [{"type": "fault_detected", "severity": "warning", "data": ev}]
            if f.get("remedy"):
                events.append({"type": "fault_healed", "severity": "info",
                               "data": {**ev, "remedy": f["remedy"], "seconds": None,
                                        "count": 1}})
            ts = time.time()
            try:
                self.fault_journal.noted(kind, check, f.get("detail", ""),
                                         remedy=f.get("remedy"), data=data, ts=ts,
                                         event=events)
            except Exception:  # noqa: BLE001 - never stops the node starting
                logger.exception("fault journal: %s not noted", kind)
                try:  # not journalled: reported all the same
                    emit_events(self.emit_event, "noted", kind, check, ts, events)
                except Exception:  # noqa: BLE001
                    logger.exception("fault %s: events not emitted", kind)
        self._startup_faults = []
        try:
            self.fault_journal.send_unsent(self.emit_event)
        except Exception:  # noqa: BLE001 - a damaged journal must not stop the start
            logger.exception("fault journal: unsent events not sent")
        self.health.start()

    def _health_stop(self) -> None:
        self.health.stop()

    def _health_final(self) -> None:
        """After every part closed node.db: the last good copy (a clean stop)."""
        from .health.db_integrity import make_last_good

        self.fault_journal.close()
        try:
            make_last_good(self.cfg.data_dir / "node.db")
        except Exception:  # noqa: BLE001 - a failed copy must not fail the stop
            logger.exception("node.db: no last good copy at stop")

    def doctor(self, fix: bool = False) -> dict:
        """Every check now (with ``fix``: each failing one's remedy), and the journal."""
        from . import selfcheck

        findings = self.health.run_all(heal=fix)
        return {**selfcheck.report(findings, legacy=False), "node_id": self.cfg.node_id,
                "fixed": fix,
                "faults": self.faults_block()}

    def faults_block(self) -> dict:
        """The fault journal's summary and the faults open now (stats, /metrics)."""
        try:
            block = self.fault_journal.stats()
        except Exception as err:  # noqa: BLE001 - a damaged node.db must not break stats
            block = {"error": str(err)}
        block["open"] = self.health.open_faults()
        block["monitor"] = dict(self.health.stats)
        return block

    def start(self) -> None:
        for sub in ("blobs", "apps", "samples", "trusted_keys"):
            (self.cfg.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.outbox.start()
        self.remote.start()
        self.fetcher.start()
        self.capture.start()
        self.alarms.start()
        self._http, self._http_thread = serve(self.flask, self.cfg.http.host, self.cfg.http.port)
        self.reconciler.start()
        self.scheduler.start()
        self.adapt.recover()
        self.telemetry.start()
        self.streams.start(self.cfg.streams)
        self._health_start()
        self.conn.on_connect(self._republish_streams)
        self.conn.subscribe(self.topics.desired(self.cfg.node_id),
                            self.reconciler.on_desired_message)
        self.reporter.start()
        self.conn.start()
        self._systemd_ready()
        logger.info("edge node %s serving on %s, broker %s:%s", self.cfg.node_id,
                    self.http_url, self.cfg.mqtt.host, self.cfg.mqtt.port)

    #: threads that live as long as the agent: one that died means the agent is broken
    VITAL_THREADS = ("reconciler", "outbox-sender", "reporter", "telemetry", "remote-ops",
                     "scheduler", "capture", "alarms", "http")

    def liveness(self, timeout: float = 5.0) -> list[str]:
        """What is wrong with the agent's own process (empty: alive): a vital thread
        that died, or the HTTP server not answering ``/v2/health/live`` within
        ``timeout``. The systemd watchdog pings only while this is empty
        (edge_node/systemd.py), and gives it half its ping interval."""
        alive = {t.name for t in threading.enumerate() if t.is_alive()}
        problems = [f"thread {n} is not running" for n in self.VITAL_THREADS if n not in alive]
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/live",
                                        timeout=timeout) as r:
                if r.status != 200:
                    problems.append(f"HTTP /v2/health/live answered {r.status}")
        except (OSError, urllib.error.URLError) as err:
            problems.append(f"HTTP /v2/health/live: {err}")
        return problems

    def _restart_to_repair(self, why: str) -> None:
        """A fault only a fresh start repairs (node.db that cannot be restored live):
        under systemd, stop cleanly (SIGTERM to ourselves, as ``systemctl restart``
        would) and let ``Restart=always`` start the agent again."""
        import signal

        self.sd.notify(f"STATUS=restarting to repair: {why}"[:400])
        logger.critical("restarting to repair: %s", why)
        os.kill(os.getpid(), signal.SIGTERM)

    def _systemd_ready(self) -> None:
        """Under systemd (``Type=notify``): READY=1, and the watchdog when it has one."""
        if not self.sd.enabled:
            return
        self.sd.notify("READY=1", f"STATUS=serving on {self.http_url}")
        every = sd_watchdog_interval()
        if every:
            self.watchdog = Watchdog(self.sd, every,
                                     lambda: self.liveness(timeout=min(5.0, every / 2)))
            self.watchdog.start()
            logger.info("systemd watchdog: pinging every %.1f s while alive", every)

    def stop(self) -> None:
        self.sd.notify("STOPPING=1")
        if self.watchdog:
            self.watchdog.stop()
        self.conn.stop()
        self.remote.stop()
        self._health_stop()
        self.reporter.stop()
        if self._http:
            self._http.shutdown()
        self.streams.stop()
        self.reconciler.stop()
        self.scheduler.stop()
        self.telemetry.stop()
        self.adapt.stop()
        self.jobs.close()
        self.alarms.stop()
        self.capture.stop()
        self.outbox.close()
        self.fetcher.stop()
        self.supervisor.stop_all()
        self.store.close()
        self._health_final()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        logger.info("edge node %s stopped", self.cfg.node_id)


def _copy(counter) -> dict:
    """A snapshot of a Counter other threads add keys to (a plain dict() of it
    can fail with 'dictionary changed size during iteration')."""
    for _ in range(5):
        try:
            return dict(counter)
        except RuntimeError:
            continue
    return {}
