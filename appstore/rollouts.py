"""Rollouts: a new app version to a set of nodes in waves, each wave gated on
the nodes' health, rolled back automatically when its gate fails.

A rollout (``POST /api/v1/rollouts``, ``aidc store rollout start``) names the
app, the version, the target (nodes, a group, a site, tags, or the whole
fleet) and how to move:

- **waves**: a canary of ``canary`` nodes first, then the rest in ``steps``
  (cumulative percentages of the target, e.g. ``[10, 50, 100]``) or in waves of
  ``wave_size`` nodes. The plan (which node in which wave) is fixed when the
  rollout is created and kept with it.
- **per wave**: the wave's nodes get the version in their desired state
  (retained, so an offline node gets it when it comes back); the wave waits
  until every *online* node of the wave reports the app ``ready`` at that
  version (``ready_timeout_s``; a node that reports ``failed``, or is not ready
  in time, fails the wave), then *bakes* for ``bake_s`` while the gate watches
  the nodes' telemetry for this version: error rate (``max_error_rate``, once
  ``min_requests`` requests were served), p95 latency (``max_p95_ms``), field
  accuracy where technicians labelled samples (``min_accuracy``, once
  ``min_labelled`` labels exist), and that the app stays ready. A node offline
  when its wave starts is not waited for: it is recorded ``offline`` and
  converges when it comes back (its desired state already says the version).
- **a failed gate** sets that wave's nodes back to the version they had (so
  they need no download: nodes keep their previous two versions), records why
  on the rollout and on each node, and halts the rollout (``failed``). Earlier
  waves passed their gates and stay; ``POST .../rollback`` reverts them too.
- **pause / resume / abort**: a paused rollout starts no new wave and its
  clocks stop; abort ends it where it is (``aborted``), optionally reverting.
- **nothing stays in progress**: ``deadline_s`` bounds the whole rollout; the
  engine turns an overrun into ``failed`` with the reason.

The engine is one thread (:meth:`RolloutEngine.start`) that ticks every
``tick_s``; each step is a database transaction, so an AppStore restarted in
the middle of a rollout carries on from its rows. Several AppStore workers on
one database each run an engine, but only the holder of a lease in
``store_meta`` (renewed every tick, taken over ``LEASE_S`` after it lapsed)
moves rollouts. Every state change is a
line in ``rollout_log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .db import Store
from .errors import BadRequest, Conflict, NotFound
from .registry import check_node_id

logger = logging.getLogger(__name__)

ACTIVE = ("waiting", "baking", "paused")
#: seconds a rollout engine's lease lasts without renewal (another worker takes over)
LEASE_S = 10.0
FINAL = ("succeeded", "failed", "aborted")


class Target(BaseModel):
    """Which nodes: the union of the listed ones and those matching every given
    attribute (``all``: the whole fleet)."""

    model_config = ConfigDict(extra="forbid")
    nodes: list[str] = Field(default_factory=list, max_length=100_000)
    group: str | None = None
    site: str | None = None
    tags: list[str] = Field(default_factory=list)
    all: bool = False

    @model_validator(mode="after")
    def _some(self) -> Target:
        if not (self.nodes or self.group or self.site or self.tags or self.all):
            raise ValueError("name nodes, a group, a site, tags, or all: true")
        for n in self.nodes:
            check_node_id(n)
        return self


class Waves(BaseModel):
    model_config = ConfigDict(extra="forbid")
    canary: int = Field(default=1, ge=0)
    #: cumulative percentages of the target after the canary, ending at 100
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    #: instead of steps: waves of this many nodes
    wave_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _steps(self) -> Waves:
        if self.wave_size is None:
            if not self.steps or any(not 0 < s <= 100 for s in self.steps) or \
                    self.steps != sorted(self.steps) or self.steps[-1] != 100:
                raise ValueError("steps: increasing percentages in (0, 100], ending at 100")
        return self


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready_timeout_s: float = Field(default=300.0, gt=0)
    bake_s: float = Field(default=60.0, ge=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    min_requests: int = Field(default=20, ge=0)
    max_p95_ms: float | None = Field(default=None, gt=0)
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    min_labelled: int = Field(default=20, ge=1)
    #: nodes of a wave that may fail before the wave fails (0: any failure fails it)
    max_failed_nodes: int = Field(default=0, ge=0)
    #: while baking, a node not reporting the app ready (but not failed) fails the wave
    #: only once it stayed so this long (a worker restart, a report in flight)
    unready_grace_s: float = Field(default=15.0, ge=0)


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    app: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    target: Target
    waves: Waves = Field(default_factory=Waves)
    gate: Gate = Field(default_factory=Gate)
    deadline_s: float = Field(default=6 * 3600.0, gt=0)
    #: leave out target nodes that have no room for the version (default: refuse)
    skip_unfit: bool = False
    #: when every wave passed, the app's channel (docs/fleet.md) points to the version
    channel: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")
    by: str | None = Field(default=None, max_length=200)


def resolve_target(db: Any, t: Target, strict: bool = True) -> list[str]:
    """The registry's nodes a target names, sorted; ``strict``: a listed node id
    the registry does not know is an error (else it is left out)."""
    rows = list(db.query("select node_id, site, grp, tags from nodes order by node_id"))
    known = {r["node_id"] for r in rows}
    unknown = [n for n in t.nodes if n not in known]
    if unknown and strict:
        raise BadRequest("unknown_node", f"not in the registry: {', '.join(unknown[:10])}")
    picked = {n for n in t.nodes if n in known}
    if t.all or t.group or t.site or t.tags:
        for r in rows:
            tags = set(json.loads(r["tags"])) if r["tags"] else set()
            if (t.group is None or r["grp"] == t.group) and \
                    (t.site is None or r["site"] == t.site) and set(t.tags) <= tags:
                picked.add(r["node_id"])
    return sorted(picked)


def plan_waves(nodes: list[str], waves: Waves) -> list[list[str]]:
    """The nodes split into waves: canary first, then by steps or wave size."""
    nodes = list(nodes)
    out: list[list[str]] = []
    canary = min(waves.canary, len(nodes))
    if canary:
        out.append(nodes[:canary])
    rest = nodes[canary:]
    if waves.wave_size:
        out += [rest[i:i + waves.wave_size] for i in range(0, len(rest), waves.wave_size)]
        return out
    done = canary
    for step in waves.steps:
        upto = max(done, min(len(nodes), math.ceil(len(nodes) * step / 100)))
        if upto > done:
            out.append(nodes[done:upto])
            done = upto
    return out


class RolloutEngine:
    """Creates rollouts and moves them along (see the module doc)."""

    def __init__(self, store: Store, catalog: Any, registry: Any,
                 assign: Callable[[str, str, str], Any],
                 unassign: Callable[[str, str], Any],
                 tick_s: float = 0.5, clock: Callable[[], float] = time.time,
                 periodic: list[tuple[float, Callable[[], Any]]] | None = None,
                 assign_many: Callable[[list[str], str, str], Any] | None = None) -> None:
        self.store, self.catalog, self.registry = store, catalog, registry
        #: (every seconds, fn) run on the engine's thread (subscription reconcile),
        #: only while this engine holds the lease: one writer of desired states,
        #: never a reconcile racing a rollout on another worker
        self.periodic = [[every, fn, 0.0] for every, fn in (periodic or [])]
        self.assign, self.unassign = assign, unassign
        #: many nodes to one version in one go (a wave of 2,000 nodes is one
        #: transaction, not 2,000); falls back to ``assign`` per node
        self.assign_many = assign_many
        self.tick_s, self.clock = tick_s, clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        #: (app, version, node) -> when a baking node was first seen not ready
        self._unready: dict[tuple[str, str, str], float] = {}
        self.leader = False

    # -- operators ---------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            req = RolloutRequest.model_validate(body)
        except ValidationError as err:
            raise BadRequest("bad_rollout", json.loads(err.json(include_url=False))) from err
        self.catalog.get_version(req.app, req.version)  # 404 unknown_version
        nodes = self._resolve(req.target)
        if not nodes:
            raise BadRequest("no_nodes", f"the target {req.target.model_dump(exclude_defaults=True)}"
                             " matches no node")
        with self.store.read() as db:
            busy = list(db.query(
                "select rollout_id from rollouts where app = ? and state in (?, ?, ?)",
                [req.app, *ACTIVE]))
        if busy:
            raise Conflict("rollout_running", f"rollout {busy[0]['rollout_id']} of "
                           f"{req.app} is still running: pause, abort or wait for it")
        unfit = self._unfit(req.app, req.version, nodes)
        if unfit and not req.skip_unfit:
            raise Conflict("placement", {"reason": f"{len(unfit)} of {len(nodes)} target "
                                         "nodes have no room for it: nothing deployed "
                                         "(free slices, or skip_unfit: true)",
                                         "nodes": dict(list(unfit.items())[:50])})
        nodes = [n for n in nodes if n not in unfit]
        if not nodes:
            raise BadRequest("no_nodes", "no target node has room for it")
        waves = plan_waves(nodes, req.waves)
        now = self.clock()
        rid = f"ro-{req.app}-{secrets.token_hex(4)}"[:64]
        with self.store.write() as db:
            current = {r["node_id"]: r["version"] for r in db.query(
                "select node_id, version from assignments where app = ?", [req.app])}
            db["rollouts"].insert({
                "rollout_id": rid, "app": req.app, "version": req.version,
                "target": req.target.model_dump_json(exclude_defaults=True),
                "plan": json.dumps({"waves": [len(w) for w in waves],
                                    **req.waves.model_dump()}),
                "gate": req.gate.model_dump_json(), "state": "waiting", "wave": -1,
                "channel": req.channel,
                "wave_started_at": None, "ready_at": None, "reason": None,
                "created_at": now, "created_by": req.by, "updated_at": now,
                "finished_at": None, "deadline": now + req.deadline_s})
            db["rollout_nodes"].insert_all(
                ({"rollout_id": rid, "node_id": n, "wave": i,
                  "prev_version": current.get(n), "state": "pending", "reason": None,
                  "updated_at": now} for i, w in enumerate(waves) for n in w),
                batch_size=1000)
            self._log(db, rid, "created", f"{req.app} {req.version} to {len(nodes)} nodes in "
                      f"{len(waves)} waves ({', '.join(str(len(w)) for w in waves)})"
                      + (f"; {len(unfit)} left out, no room: " + "; ".join(
                          f"{n}: {why}" for n, why in list(unfit.items())[:5])
                         if unfit else ""))
        logger.info("rollout %s: %s %s to %d nodes, waves %s", rid, req.app, req.version,
                    len(nodes), [len(w) for w in waves])
        self._wake.set()
        return self.get(rid)

    def _unfit(self, app: str, version: str, nodes: list[str]) -> dict[str, str]:
        """Target nodes whose reported cards have no room for the version: node -> why."""
        from .placement import fits, request

        manifest = self.catalog.get_version(app, version)["manifest"]
        out: dict[str, str] = {}
        with self.store.read() as db:
            override = {r["node_id"]: json.loads(r["resources"]) if r["resources"] else None
                        for r in db.query("select node_id, resources from assignments "
                                          "where app = ?", [app])}
            for i in range(0, len(nodes), 500):
                chunk = nodes[i:i + 500]
                for row in db.query(f"select node_id, reported from nodes where node_id in "
                                    f"({','.join('?' * len(chunk))})", chunk):
                    cards = (json.loads(row["reported"]) or {}).get("cards", []) \
                        if row["reported"] else []
                    ok, why = fits(cards, app, request(manifest, override.get(row["node_id"])))
                    if not ok:
                        out[row["node_id"]] = why
        return out

    def pause(self, rid: str, by: str | None = None) -> dict[str, Any]:
        return self._set_state(rid, "paused", ("waiting", "baking"), f"paused by {by or '?'}")

    def resume(self, rid: str, by: str | None = None) -> dict[str, Any]:
        with self._lock:
            r = self._row(rid)
            if r["state"] != "paused":
                raise Conflict("not_paused", f"rollout {rid} is {r['state']}, not paused")
            paused_for = self.clock() - r["updated_at"]
            with self.store.write() as db:
                # the clocks stopped while paused: the wave restarts its wait
                if db.execute("update rollouts set state = 'waiting', wave_started_at = "
                              "wave_started_at + ?, deadline = deadline + ?, ready_at = null, "
                              "updated_at = ? where rollout_id = ? and state = 'paused'",
                              [paused_for, paused_for, self.clock(), rid]).rowcount:
                    self._log(db, rid, "resumed", f"by {by or '?'} after {paused_for:.0f} s")
            out = self.get(rid)  # the answer is what resuming did, before the engine moves on
        self._wake.set()
        return out

    def abort(self, rid: str, by: str | None = None, rollback: bool = False) -> dict[str, Any]:
        with self._lock:
            r = self._row(rid)
            if r["state"] in FINAL:
                raise Conflict("rollout_finished", f"rollout {rid} already {r['state']}")
            why = f"aborted by {by or '?'}"
            if rollback:
                self._revert(rid, r["app"], None, why)
            self._finish(rid, "aborted", why)
        return self.get(rid)

    def rollback(self, rid: str, by: str | None = None) -> dict[str, Any]:
        """Every node this rollout moved goes back to the version it had."""
        with self._lock:
            r = self._row(rid)
            if r["state"] not in FINAL:
                raise Conflict("rollout_running", f"rollout {rid} is {r['state']}: abort it "
                               "with rollback instead")
            n = self._revert(rid, r["app"], None, f"rolled back by {by or '?'}")
            with self.store.write() as db:
                self._log(db, rid, "rolled_back", f"{n} nodes back to their previous version "
                          f"(by {by or '?'})")
        return self.get(rid)

    def _set_state(self, rid: str, state: str, allowed: tuple, why: str) -> dict[str, Any]:
        with self._lock:
            r = self._row(rid)
            if r["state"] not in allowed:
                raise Conflict("bad_state", f"rollout {rid} is {r['state']}")
            with self.store.write() as db:
                ph = ",".join("?" * len(allowed))
                if db.execute(f"update rollouts set state = ?, updated_at = ? where "
                              f"rollout_id = ? and state in ({ph})",
                              [state, self.clock(), rid, *allowed]).rowcount:
                    self._log(db, rid, state, why)
        return self.get(rid)

    # -- queries -----------------------------------------------------------------
    def _row(self, rid: str) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from rollouts where rollout_id = ?", [rid]))
        if not rows:
            raise NotFound("unknown_rollout", f"no rollout {rid!r}")
        return rows[0]

    def get(self, rid: str, nodes: bool = True) -> dict[str, Any]:
        r = self._row(rid)
        with self.store.read() as db:
            counts = {(x["wave"], x["state"]): x["n"] for x in db.query(
                "select wave, state, count(*) as n from rollout_nodes where rollout_id = ? "
                "group by wave, state", [rid])}
            log = list(db.query("select ts, what, detail from rollout_log where rollout_id = ?"
                                " order by id", [rid]))
            rows = list(db.query("select node_id, wave, prev_version, state, reason, "
                                 "updated_at from rollout_nodes where rollout_id = ? "
                                 "order by wave, node_id", [rid])) if nodes else None
        plan = json.loads(r["plan"])
        waves = [{"wave": i, "nodes": n, "states": {s: c for (w, s), c in counts.items()
                                                     if w == i}}
                 for i, n in enumerate(plan["waves"])]
        out = {k: r.get(k) for k in (
            "rollout_id", "app", "version", "channel", "state", "wave", "reason", "created_at",
            "created_by", "updated_at", "finished_at", "wave_started_at", "deadline")}
        out.update(target=json.loads(r["target"]), gate=json.loads(r["gate"]), waves=waves,
                   log=log)
        if rows is not None:
            out["nodes"] = rows
        return out

    def list(self, app: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "select rollout_id from rollouts" + (" where app = ?" if app else "") + \
            " order by created_at desc limit ?"
        with self.store.read() as db:
            ids = [r["rollout_id"] for r in db.query(sql, ([app] if app else []) + [limit])]
        return [self.get(i, nodes=False) for i in ids]

    def _resolve(self, t: Target) -> list[str]:
        with self.store.read() as db:
            return resolve_target(db, t)

    # -- the engine --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(5)

    def nudge(self) -> None:
        """Something changed (a node reported): tick soon."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the engine must outlive one bad tick
                logger.exception("rollout tick")
            if not self.leader:
                continue  # the periodic jobs (subscriptions) run where the rollouts do
            now = time.monotonic()
            for job in self.periodic:
                if now - job[2] >= job[0]:
                    job[2] = now
                    try:
                        job[1]()
                    except Exception:  # noqa: BLE001
                        logger.exception("periodic %s", getattr(job[1], "__name__", job[1]))

    def _lease(self) -> bool:
        """One engine moves rollouts when several AppStore workers share the database:
        a lease in ``store_meta``, renewed every tick, taken over when it lapsed."""
        now = self.clock()
        with self.store.write() as db:
            db.execute(
                "insert into store_meta (key, value) values ('rollout_lease', :v) "
                "on conflict(key) do update set value = excluded.value "
                "where json_extract(store_meta.value, '$.owner') = :me "
                "or json_extract(store_meta.value, '$.until') < :now",
                {"v": json.dumps({"owner": self.owner, "until": now + LEASE_S}),
                 "me": self.owner, "now": now})
            cur = next(db.query("select value from store_meta where key = 'rollout_lease'"))
        held = json.loads(cur["value"])["owner"] == self.owner
        if held != self.leader:
            logger.info("rollout engine %s: %s the lease", self.owner,
                        "took" if held else "lost")
            self.leader = held
        return held

    def tick(self) -> None:
        if not self._lease():
            return  # another AppStore worker moves the rollouts
        with self.store.read() as db:
            active = list(db.query("select * from rollouts where state in ('waiting', "
                                   "'baking') order by created_at"))
        for r in active:
            with self._lock:
                # read again under the lock: an operator may have paused or aborted it
                # since the list was read (a stale row would write its state back)
                r = self._row(r["rollout_id"])
                if r["state"] in ("waiting", "baking"):
                    self._step(r)

    def _step(self, r: dict[str, Any]) -> None:
        rid, now = r["rollout_id"], self.clock()
        gate = Gate.model_validate_json(r["gate"])
        if r["deadline"] and now > r["deadline"]:
            self._fail(r, r["wave"], "timed out: the rollout passed its deadline")
            return
        n_waves = len(json.loads(r["plan"])["waves"])
        if r["wave"] < 0:
            self._start_wave(r, 0)
            return
        wave = r["wave"]
        nodes = self._wave_nodes(rid, wave)
        status = self._status(r["app"], r["version"], [n["node_id"] for n in nodes])
        failed, waiting = [], []
        with self.store.write() as db:
            for n in nodes:
                if n["state"] in ("offline", "failed", "rolled_back"):
                    if n["state"] == "failed":
                        failed.append(n)
                    continue
                st, why = status.get(n["node_id"], ("waiting", None))
                if st == "failed":
                    failed.append({**n, "reason": why})
                    db.execute("update rollout_nodes set state = 'failed', reason = ?, "
                               "updated_at = ? where rollout_id = ? and node_id = ?",
                               [why, now, rid, n["node_id"]])
                elif st == "ready" and n["state"] != "ready":
                    db.execute("update rollout_nodes set state = 'ready', updated_at = ? "
                               "where rollout_id = ? and node_id = ?", [now, rid, n["node_id"]])
                elif st == "waiting":
                    waiting.append(n)
        if len(failed) > gate.max_failed_nodes:
            self._fail(r, wave, f"wave {wave}: {len(failed)} node(s) failed: " + "; ".join(
                f"{f['node_id']}: {f['reason']}" for f in failed[:5]))
            return
        if r["state"] == "waiting":
            if waiting:
                if now - r["wave_started_at"] > gate.ready_timeout_s:
                    names = ", ".join(n["node_id"] for n in waiting[:5])
                    self._fail(r, wave, f"wave {wave}: not ready after {gate.ready_timeout_s:g}"
                               f" s: {names}" + (" ..." if len(waiting) > 5 else ""))
                return
            with self.store.write() as db:
                if db.execute("update rollouts set state = 'baking', ready_at = ?, "
                              "updated_at = ? where rollout_id = ? and state = 'waiting'",
                              [now, now, rid]).rowcount:
                    self._log(db, rid, "baking", f"wave {wave}: ready, baking {gate.bake_s:g} s")
            return
        # baking: the health gate
        problem = self._health(r["app"], r["version"], [n["node_id"] for n in nodes
                                                       if n["state"] != "offline"], gate)
        if problem:
            self._fail(r, wave, f"wave {wave}: {problem}")
            return
        if now - (r["ready_at"] or now) < gate.bake_s:
            return
        if wave + 1 < n_waves:
            with self.store.write() as db:
                self._log(db, rid, "wave_passed", f"wave {wave} passed its gate")
            self._start_wave(r, wave + 1)
        else:
            why = f"all {n_waves} waves passed their gates"
            late = self._join_late(r, n_waves - 1, assign=True)
            if late:
                why += f"; {late} node(s) that joined the target meanwhile given it"
            if r.get("channel"):
                now = self.clock()
                with self.store.write() as db:
                    db.execute(
                        "insert into channels (app, channel, version, updated_at, updated_by) "
                        "values (?, ?, ?, ?, ?) on conflict(app, channel) do update set "
                        "version = excluded.version, updated_at = excluded.updated_at, "
                        "updated_by = excluded.updated_by",
                        [r["app"], r["channel"], r["version"], now, f"rollout {rid}"])
                why += f"; channel {r['channel']} now {r['version']}"
            self._finish(rid, "succeeded", why)

    def _wave_nodes(self, rid: str, wave: int) -> list[dict[str, Any]]:
        with self.store.read() as db:
            return list(db.query("select * from rollout_nodes where rollout_id = ? and "
                                 "wave = ?", [rid, wave]))

    def _join_late(self, r: dict[str, Any], last: int, assign: bool = False) -> int:
        """Nodes that joined the target after the rollout was planned (enrolled, or
        labelled into its group) join its last wave, so a rollout's target is what
        it names *now*, not a snapshot: a node that joins a group mid-rollout is not
        left on the old version. Before the last wave starts they simply join it; once
        every wave passed (``assign``) they are given the version that passed every
        gate, recorded ``assigned`` (not waited for, like a node that was offline).
        Nodes without room for it are left out, logged with why. How many joined."""
        rid = r["rollout_id"]
        with self.store.read() as db:
            target = Target.model_validate_json(r["target"])
            planned = {x["node_id"] for x in db.query(
                "select node_id from rollout_nodes where rollout_id = ?", [rid])}
            new = [n for n in resolve_target(db, target, strict=False) if n not in planned]
            if not new:
                return 0
            current = {x["node_id"]: x["version"] for x in db.query(
                "select node_id, version from assignments where app = ?", [r["app"]])}
        unfit = self._unfit(r["app"], r["version"], new)
        new = [n for n in new if n not in unfit]
        if new and assign:
            if self.assign_many is not None:
                self.assign_many(new, r["app"], r["version"])
            else:
                for n in new:
                    self.assign(n, r["app"], r["version"])
        now = self.clock()
        with self.store.write() as db:
            db["rollout_nodes"].insert_all(
                ({"rollout_id": rid, "node_id": n, "wave": last,
                  "prev_version": current.get(n),
                  "state": "assigned" if assign else "pending",
                  "reason": "joined the target after its waves passed" if assign else None,
                  "updated_at": now} for n in new), batch_size=1000, ignore=True)
            plan = json.loads(r["plan"])
            plan["waves"][last] += len(new)
            db.execute("update rollouts set plan = ? where rollout_id = ?",
                       [json.dumps(plan), rid])
            r["plan"] = json.dumps(plan)
            self._log(db, rid, "joined", f"{len(new)} node(s) joined the target: "
                      + ", ".join(new[:10]) + (" ..." if len(new) > 10 else "")
                      + (f" ({'given it' if assign else f'in wave {last}'})")
                      + (f"; {len(unfit)} left out, no room: " + "; ".join(
                          f"{n}: {why}" for n, why in list(unfit.items())[:5])
                         if unfit else ""))
        logger.info("rollout %s: %d node(s) joined its target", rid, len(new))
        return len(new)

    def _start_wave(self, r: dict[str, Any], wave: int) -> None:
        rid, now = r["rollout_id"], self.clock()
        n_waves = len(json.loads(r["plan"])["waves"])
        if wave == n_waves - 1:
            self._join_late(r, wave)
        nodes = self._wave_nodes(rid, wave)
        with self.store.read() as db:
            online = {x["node_id"] for x in db.query(
                "select node_id from nodes where online = 1 and node_id in (select node_id "
                "from rollout_nodes where rollout_id = ? and wave = ?)", [rid, wave])}
        if self.assign_many is not None:
            self.assign_many([n["node_id"] for n in nodes], r["app"], r["version"])
        else:
            for n in nodes:
                self.assign(n["node_id"], r["app"], r["version"])
        with self.store.write() as db:
            for n in nodes:
                state = "assigned" if n["node_id"] in online else "offline"
                db.execute("update rollout_nodes set state = ?, reason = ?, updated_at = ? "
                           "where rollout_id = ? and node_id = ?",
                           [state, None if state == "assigned" else
                            "offline when its wave started: converges when it is back",
                            now, rid, n["node_id"]])
            db.execute("update rollouts set wave = ?, state = 'waiting', wave_started_at = ?, "
                       "ready_at = null, updated_at = ? where rollout_id = ? and state in "
                       "('waiting', 'baking')", [wave, now, now, rid])
            off = len(nodes) - len(online)
            self._log(db, rid, "wave_started", f"wave {wave}: {len(nodes)} nodes"
                      + (f" ({off} offline, not waited for)" if off else ""))

    def _status(self, app: str, version: str, nodes: list[str]
                ) -> dict[str, tuple[str, str | None]]:
        """Per node: ready / failed (why) / waiting, from the reported states."""
        out: dict[str, tuple[str, str | None]] = {}
        with self.store.read() as db:
            for i in range(0, len(nodes), 500):
                chunk = nodes[i:i + 500]
                for row in db.query(
                        f"select node_id, online, reported from nodes where node_id in "
                        f"({','.join('?' * len(chunk))})", chunk):
                    rep = json.loads(row["reported"]) if row["reported"] else {}
                    mine = [a for a in rep.get("apps", []) if a.get("name") == app]
                    a = mine[0] if mine else None
                    if a is None or a.get("version") != version:
                        out[row["node_id"]] = ("waiting", None)
                    elif a.get("status") == "ready":
                        out[row["node_id"]] = ("ready", None)
                    elif a.get("status") == "failed":
                        out[row["node_id"]] = ("failed", f"{app} {version} failed on the node: "
                                               f"{a.get('error') or 'no reason given'}")
                    else:
                        out[row["node_id"]] = ("waiting", None)
        return out

    def _health(self, app: str, version: str, nodes: list[str], gate: Gate) -> str | None:
        """Why the wave's health fails its gate, or None."""
        if not nodes:
            return None
        status = self._status(app, version, nodes)
        now = self.clock()
        down = []
        for n in nodes:
            key = (app, version, n)
            if status.get(n, ("waiting",))[0] == "ready":
                self._unready.pop(key, None)
            elif now - self._unready.setdefault(key, now) >= gate.unready_grace_s:
                down.append(n)
        if down:
            why = status.get(down[0], ("", None))[1] or \
                f"not ready for {gate.unready_grace_s:g} s"
            return f"{len(down)} node(s) not ready while baking ({down[0]}: {why})"
        ph = ",".join("?" * len(nodes))
        with self.store.read() as db:
            h = next(db.query(
                f"select coalesce(sum(requests), 0) as req, coalesce(sum(errors), 0) as err, "
                f"max(p95_max_ms) as p95 from app_health where app = ? and version = ? and "
                f"node_id in ({ph})", [app, version, *nodes]))
            acc = next(db.query(
                f"select sum(json_extract(data, '$.labelled')) as n, "
                f"sum(json_extract(data, '$.correct')) as ok from telemetry_latest "
                f"where app = ? and json_extract(data, '$.version') = ? and node_id in ({ph})",
                [app, version, *nodes]))
        if h["req"] >= max(1, gate.min_requests) and \
                h["err"] / h["req"] > gate.max_error_rate + 1e-12:
            return (f"error rate {h['err'] / h['req']:.3f} > {gate.max_error_rate:g} "
                    f"({h['err']} of {h['req']} requests)")
        if gate.max_p95_ms is not None and h["p95"] is not None and h["p95"] > gate.max_p95_ms:
            return f"p95 latency {h['p95']:g} ms > {gate.max_p95_ms:g} ms"
        if gate.min_accuracy is not None and (acc["n"] or 0) >= gate.min_labelled:
            a = acc["ok"] / acc["n"]
            if a < gate.min_accuracy - 1e-12:
                return (f"field accuracy {a:.3f} < {gate.min_accuracy:g} "
                        f"({acc['ok']} of {acc['n']} labelled samples)")
        return None

    def _fail(self, r: dict[str, Any], wave: int, why: str) -> None:
        rid = r["rollout_id"]
        n = self._revert(rid, r["app"], wave, f"rolled back: {why}") if wave >= 0 else 0
        self._finish(rid, "failed", why + (f"; wave {wave} rolled back ({n} nodes)"
                                           if wave >= 0 else ""))

    def _revert(self, rid: str, app: str, wave: int | None, why: str) -> int:
        """Nodes of the wave (None: every node the rollout moved) back to their
        previous version (or without the app if they had none)."""
        sql = ("select node_id, prev_version from rollout_nodes where rollout_id = ? and "
               "state not in ('pending', 'rolled_back')")
        args: list[Any] = [rid]
        if wave is not None:
            sql += " and wave = ?"
            args.append(wave)
        with self.store.read() as db:
            rows = list(db.query(sql, args))
        for row in rows:
            try:
                if row["prev_version"]:
                    self.assign(row["node_id"], app, row["prev_version"])
                else:
                    self.unassign(row["node_id"], app)
            except NotFound:
                pass  # already without the app
        now = self.clock()
        with self.store.write() as db:
            for row in rows:
                db.execute("update rollout_nodes set state = 'rolled_back', reason = ?, "
                           "updated_at = ? where rollout_id = ? and node_id = ?",
                           [why, now, rid, row["node_id"]])
        logger.warning("rollout %s: %d node(s) back to their previous %s: %s", rid, len(rows),
                       app, why)
        return len(rows)

    def _finish(self, rid: str, state: str, why: str) -> None:
        """End the rollout unless it ended meanwhile (another AppStore worker's
        operator request, or its engine): a final state is never overwritten."""
        now = self.clock()
        with self.store.write() as db:
            if not db.execute("update rollouts set state = ?, reason = ?, finished_at = ?, "
                              "updated_at = ? where rollout_id = ? and state not in "
                              "('succeeded', 'failed', 'aborted')",
                              [state, why, now, now, rid]).rowcount:
                return
            self._log(db, rid, state, why)
        (logger.info if state == "succeeded" else logger.warning)("rollout %s %s: %s", rid,
                                                                   state, why)

    def _log(self, db: Any, rid: str, what: str, detail: str) -> None:
        db["rollout_log"].insert({"rollout_id": rid, "ts": self.clock(), "what": what,
                                  "detail": detail})
