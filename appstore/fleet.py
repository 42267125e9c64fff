"""The MQTT side of the AppStore: node twins in, feedback/events in, acks and
desired state out.

- plain subscriptions to every node's retained ``availability`` and
  ``state/reported``: the latest message per node and kind is kept (coalesced,
  so a fleet's worth of retained messages can never overflow anything) and
  upserted into the registry;
- a *shared* subscription to every node's ``feedback`` and ``events``, so
  several AppStore workers split the fleet; these go through a bounded queue
  (when full they are dropped unacked and counted: the node resends them);
- one ingest thread does every DB write (never the paho network thread), in
  batches, one transaction per batch, and publishes :class:`Ack` after commit;
  duplicates are acked again, rejected messages whose msg_id can be recovered
  are acked with ``ok=False`` and the reason so the node stops resending;
- :meth:`assign` / :meth:`unassign` publish the node's retained
  :class:`DesiredState` (QoS 1); every (re)connect republishes every node's
  desired state, since a broker without persistence forgets retained messages.
  With several AppStore workers on one database, a publish is followed by a
  look at the revisions: a node another worker changed meanwhile is published
  again, so the broker never keeps an older state than the database's.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from cloud_sync.connection import MqttConnection
from cloud_sync.errors import MessageRejected
from cloud_sync.schemas import (
    Ack,
    AckItem,
    Availability,
    DesiredState,
    EventMessage,
    FeedbackMessage,
    ReportedState,
    Telemetry,
    TrainingSchedule,
    parse,
)
from cloud_sync.topics import Topics

from .catalog import Catalog
from .db import Store
from .feedback import FeedbackStore
from .registry import Registry, check_node_id

logger = logging.getLogger(__name__)

BATCH = 500
ACKS_PER_MESSAGE = 1000
_NUDGE = ("nudge",)


def recover_msg_id(payload: bytes) -> str | None:
    """The msg_id of a message that failed validation, if one can be read."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    mid = obj.get("msg_id") if isinstance(obj, dict) else None
    return mid if isinstance(mid, str) and 8 <= len(mid) <= 64 else None


class Fleet:
    def __init__(
        self,
        conn: MqttConnection,
        topics: Topics,
        store: Store,
        registry: Registry,
        catalog: Catalog,
        feedback: FeedbackStore,
        shared_group: str | None = "appstore",
        queue_size: int = 10000,
    ) -> None:
        self.conn = conn
        self.topics = topics
        self.store = store
        self.registry = registry
        self.catalog = catalog
        self.feedback = feedback
        self.shared_group = shared_group
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self._latest: dict[tuple[str, str], tuple[bytes, bool, float]] = {}
        self._latest_lock = threading.Lock()
        self._republish = threading.Event()
        self._desired_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: Counter[str] = Counter()
        #: called after a batch with reported states or telemetry is committed
        #: (the rollout engine ticks at once instead of at its next tick)
        self.on_reported: Any = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Register subscriptions and the on-connect hook (call before or after
        ``conn.start()``), start the ingest thread, schedule a republish."""
        t = self.topics
        self.conn.subscribe(t.all_nodes("availability"), self._on_state)
        self.conn.subscribe(t.all_nodes("state/reported"), self._on_state)
        # QoS 0, latest wins (coalesced like the twins): a fleet's telemetry costs
        # one write per node and interval at most
        self.conn.subscribe(t.shared(self.shared_group, t.all_nodes("telemetry")),
                            self._on_state)
        self.conn.subscribe(t.shared(self.shared_group, t.all_nodes("feedback")), self._on_uplink)
        self.conn.subscribe(t.shared(self.shared_group, t.all_nodes("events")), self._on_uplink)
        self.conn.on_connect(self._on_connected)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="appstore-ingest", daemon=True)
        self._thread.start()
        self._on_connected()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._nudge()
        if self._thread:
            self._thread.join(timeout)
        self._thread = None

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self.stats)
        out["queued"] = self._q.qsize()
        return out

    # -- network thread: quick hand-offs only --------------------------------------
    def _nudge(self) -> None:
        try:
            self._q.put_nowait(_NUDGE)
        except queue.Full:
            pass  # the ingest thread is busy and will look at the state anyway

    def _on_connected(self) -> None:
        self._republish.set()
        self._nudge()

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            node_id, kind = self.topics.parse(topic)
        except MessageRejected:
            self._count("rejected_bad_topic")
            return
        if not payload:  # a cleared retained message
            return
        with self._latest_lock:
            self._latest[(node_id, kind)] = (payload, retained, time.time())
        self._nudge()

    def _on_uplink(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            self._q.put_nowait(("uplink", topic, payload, time.time()))
        except queue.Full:
            self._count("dropped_queue_full")
            logger.warning("ingest queue full: dropped a message on %s unacked (node resends)",
                           topic)

    # -- ingest thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._q.get(timeout=0.5)]
            except queue.Empty:
                items = []
            while len(items) < BATCH:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            uplinks = [i for i in items if i[0] == "uplink"]
            with self._latest_lock:
                states, self._latest = self._latest, {}
            if uplinks or states:
                try:
                    self._ingest(states, uplinks)
                except Exception:  # noqa: BLE001 - unacked messages are resent by nodes
                    self._count("ingest_error")
                    logger.exception("ingest batch of %d failed", len(uplinks) + len(states))
                    with self._latest_lock:  # twins are not resent: keep them for a retry
                        self._latest = {**states, **self._latest}
                    self._stop.wait(0.5)
            if self._republish.is_set():
                self._republish.clear()
                try:
                    self.republish_all()
                except Exception:  # noqa: BLE001
                    logger.exception("republishing desired states failed")
                    self._republish.set()
                    self._stop.wait(1.0)

    def _reject(self, db: Any, err: MessageRejected, topic: str, now: float) -> None:
        self._count(f"rejected_{err.reason}")
        self.feedback.record_rejection(db, err.reason, err.detail, now)
        logger.warning("rejected message on %s: %s", topic, err)

    def _ingest(self, states: dict[tuple[str, str], tuple[bytes, bool, float]],
                uplinks: list[tuple[Any, ...]]) -> None:
        acks: dict[str, list[AckItem]] = defaultdict(list)
        with self.store.write() as db:
            for (node_id, kind), (payload, retained, at) in states.items():
                try:
                    with db.atomic():
                        self._state(db, node_id, kind, payload, retained, at)
                except MessageRejected as err:
                    self._reject(db, err, self.topics.node(node_id, kind), at)
            for _, topic, payload, at in uplinks:
                try:
                    node_id, kind = self.topics.parse(topic)
                except MessageRejected as err:
                    self._reject(db, err, topic, at)
                    continue
                try:
                    with db.atomic():
                        item = self._uplink(db, node_id, kind, payload, at)
                except MessageRejected as err:
                    self._reject(db, err, topic, at)
                    mid = recover_msg_id(payload)
                    item = AckItem(msg_id=mid, ok=False, reason=err.reason) if mid else None
                except Exception:  # noqa: BLE001 - one bad message must not sink the batch
                    self._count("store_error")
                    logger.exception("storing a message from %s failed (not acked)", node_id)
                    item = None
                if item is not None:
                    acks[node_id].append(item)
        if self.on_reported is not None and any(kind != "availability"
                                                for _, kind in states):
            self.on_reported()
        for node_id, items in acks.items():
            for i in range(0, len(items), ACKS_PER_MESSAGE):
                msg = Ack(acks=items[i:i + ACKS_PER_MESSAGE])
                if self.conn.publish(self.topics.ack(node_id), msg.to_bytes(), qos=1):
                    self._count("acks_sent", len(msg.acks))
                else:
                    self._count("acks_unsent", len(msg.acks))

    def _state(self, db: Any, node_id: str, kind: str, payload: bytes, retained: bool,
               at: float) -> None:
        if kind == "availability":
            self.registry.record_availability(db, node_id, parse(Availability, payload),
                                              retained, at)
        elif kind == "telemetry":
            tm = parse(Telemetry, payload)
            if tm.node_id != node_id:
                raise MessageRejected("node_mismatch",
                                      f"telemetry node_id {tm.node_id!r} on {node_id!r}'s topic")
            self._count("telemetry_points", self.feedback.record_telemetry(db, node_id, tm, at))
        else:
            rs = parse(ReportedState, payload)
            if rs.node_id != node_id:
                raise MessageRejected("node_mismatch",
                                      f"reported node_id {rs.node_id!r} on {node_id!r}'s topic")
            self.registry.record_reported(db, node_id, rs, retained, at)
        self._count(f"{kind.replace('/', '_')}_received")

    def _uplink(self, db: Any, node_id: str, kind: str, payload: bytes, at: float) -> AckItem:
        if kind == "feedback":
            fb = parse(FeedbackMessage, payload)
            new = self.feedback.record_feedback(db, node_id, fb, at)
            mid = fb.msg_id
        else:
            ev = parse(EventMessage, payload)
            new = self.feedback.record_event(db, node_id, ev, at)
            mid = ev.msg_id
        self._count(f"{kind}_stored" if new else f"{kind}_duplicate")
        return AckItem(msg_id=mid, ok=True)

    # -- desired state -----------------------------------------------------------
    def assign(self, node_id: str, app: str, version: str,
               resources: dict | None = None, upload: str | None = None) -> DesiredState:
        """Want ``app`` ``version`` on ``node_id`` (with an optional resource
        override); publishes the new desired state."""
        check_node_id(node_id)
        with self._desired_lock:
            self.catalog.get_version(app, version)  # NotFound for an unknown version
            self.registry.assign(node_id, app, version, resources, upload)
            return self._publish_settled(node_id)

    def set_version(self, node_id: str, app: str, version: str) -> DesiredState:
        """Move ``app`` on the node to ``version``, keeping its resource override and
        upload level (rollouts, subscriptions)."""
        cur = next((a for a in self.registry.assignments(node_id) if a["app"] == app), None)
        res = json.loads(cur["resources"]) if cur and cur["resources"] else None
        return self.assign(node_id, app, version, res, cur["upload"] if cur else None)

    def set_versions(self, node_ids: list[str], app: str, version: str) -> int:
        """:meth:`set_version` for many nodes: one transaction, then each changed
        node's desired state published; how many changed."""
        with self._desired_lock:
            self.catalog.get_version(app, version)
            changed = self.registry.set_versions(node_ids, app, version)
            sent = {}
            with self.store.read() as db:
                for node_id in changed:
                    ds = self._publish_desired(node_id, self.registry._desired(db, node_id))
                    sent[node_id] = ds.revision
            self._settle(sent)
        return len(changed)

    def set_training(self, node_id: str, training: TrainingSchedule | None) -> DesiredState:
        """Set (None: clear) the node's training windows; publishes the desired state."""
        with self._desired_lock:
            self.registry.set_training(node_id, training)
            return self._publish_settled(node_id)

    def unassign(self, node_id: str, app: str) -> DesiredState:
        with self._desired_lock:
            self.registry.unassign(node_id, app)
            return self._publish_settled(node_id)

    def _settle(self, sent: dict[str, int], every: bool = False) -> int:
        """Publish again each node of ``sent`` (node -> the revision we published)
        whose desired revision moved meanwhile (``every``: any node that has one).

        Another AppStore worker on the database may change a node between our
        read and our publish, and publish its newer state first: the broker would
        keep our older copy (retained) and a node offline now would come back to
        it. Its commit comes before its publish, so reading after ours and sending
        what moved leaves the newest state last. How many were sent again."""
        total = 0
        for _ in range(3):
            with self.store.read() as db:
                if every:
                    rows = list(db.query("select node_id, desired_revision from nodes "
                                         "where desired_revision > 0"))
                else:
                    ids, rows = list(sent), []
                    for i in range(0, len(ids), 500):
                        chunk = ids[i:i + 500]
                        rows += db.query("select node_id, desired_revision from nodes where "
                                         f"node_id in ({','.join('?' * len(chunk))})", chunk)
            moved = [r["node_id"] for r in rows if sent.get(r["node_id"]) != r["desired_revision"]]
            if not moved:
                break
            for node_id in moved:
                sent[node_id] = self._publish_desired(node_id).revision
            total += len(moved)
            self._count("desired_republished_moved", len(moved))
        return total

    def _publish_desired(self, node_id: str, ds: DesiredState | None = None) -> DesiredState:
        ds = ds or self.registry.desired(node_id)
        ok = self.conn.publish(self.topics.desired(node_id), ds.to_bytes(), qos=1, retain=True)
        self._count("desired_published" if ok else "desired_unsent")
        if not ok:
            logger.info("node %s: desired revision %d not sent (offline); sent on reconnect",
                        node_id, ds.revision)
        return ds

    def _publish_settled(self, node_id: str) -> DesiredState:
        ds = self._publish_desired(node_id)
        if self._settle({node_id: ds.revision}):
            ds = self.registry.desired(node_id)
        return ds

    def republish_all(self) -> int:
        """Publish every node's desired state again (after a (re)connect)."""
        if not self.conn.connected.is_set():
            return 0
        with self._desired_lock:
            states = self.registry.all_desired()
            for ds in states:
                self._publish_desired(ds.node_id, ds)
            self._settle({ds.node_id: ds.revision for ds in states}, every=True)
        self._count("republished")
        if states:
            logger.info("republished the desired state of %d nodes", len(states))
        return len(states)
