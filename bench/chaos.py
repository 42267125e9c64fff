"""A bounded chaos run on a whole site: random faults while the node works, then
every sample and event the node produced is looked for in the cloud.

    python bench/chaos.py --duration 120 --seed 1
    python bench/chaos.py --duration 40 --faults broker_stop,worker_kill

The site is :class:`stack.Stack` (Mosquitto, the AppStore, the digits app, one
edge agent as a process under a stand-in for systemd, a TCP proxy on the broker
link) with a camera stream reading a looping video file of held-out digits
(blends of two digits among them: hard examples). While it runs:

- **load**: HTTP classification requests (``/v2/models/digits/classify``, PNG
  images of held-out digits and blends of two) at ``--rate`` a second; the
  doubtful ones become hard examples, i.e. feedback samples through the outbox;
  the camera stream gives results, hard examples (its frames as PNG samples) and
  ``stream_label`` events (the node's own events, each time the label changes)
  and alarms (a rule on a clear 7: ``alarm_raised``, ``alarm_cleared``);
  a technician labels samples and acknowledges alarms through the node's API
  (``sample_labelled``, ``alarm_acknowledged``); the stack's probe asks for one
  inference every 0.5 s (its digit is a hard example too); the node's health
  monitor adds its ``fault_*`` events;
- **faults**, one every ``--gap`` seconds (uniform), of a kind drawn at random
  (``--seed``): ``broker_stop`` (Mosquitto stopped for 1-6 s, no persistence),
  ``worker_kill`` (kill -9 of the app's worker), ``link_half_open`` (the broker
  link held half-open by the proxy: no FIN, no RST), ``agent_kill`` (kill -9 of
  the agent, its workers and capture processes die with it; the service manager
  restarts it as systemd would).

Then the chaos stops, the HTTP load stops, the camera is unplugged (its video
file renamed: the stream goes offline at the end of its loop) and the node
drains: its outbox empties. Then the count.

**Produced at the edge** is what the node committed to its own database
(``node.db``), read by polling it every second from outside the agent (a
kill -9 cannot hide a row committed before it): a sample is produced once its
``samples`` row is committed (it is written before it enters the outbox; one
not yet queued when the agent died is requeued at the next start), an event
once its outbox row is committed (``emit_event`` writes it there first). The
poll keeps every id it ever saw: the outbox prunes acked rows beyond its newest
1,000. A result still in the agent's memory when it was killed was never
produced (its request may have failed, and was counted so). Samples the site
keeps home by policy (upload level ``none``, too large) are counted apart.

**Arrived in the cloud** is what the AppStore stored for the node (its
``feedback`` and ``events`` tables), by msg_id. Reported per kind: ``lost``
(produced, never arrived), ``duplicated`` (a msg_id, or a sample id, stored
twice: must be 0, the cloud stores a msg_id once), ``extra`` (arrived, never
seen produced), and ``resends_deduplicated`` (a resend the cloud recognised and
acked again without storing it: at-least-once delivery at work). Exit status 1
when anything was lost or duplicated.

Results: JSON (``--out``) and a summary on stdout (docs/faults.md, "Chaos run").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import NODE_ID, Background, Stack, http  # noqa: E402

logger = logging.getLogger("bench.chaos")
KINDS = ("broker_stop", "worker_kill", "link_half_open", "agent_kill")
#: uploads a site keeps home by policy: never expected in the cloud
HOME = ("none",)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                           check_same_thread=False)


# -- produced: the node's own database ------------------------------------------
class Ledger:
    """Every sample and outbox row the node ever committed, polled from node.db."""

    def __init__(self, db: Path, every: float = 1.0) -> None:
        self.db, self.every = db, every
        self.outbox: dict[str, dict] = {}  # msg_id -> {kind, state}
        self.samples: dict[str, dict] = {}  # sample_id -> {shared, queued, source}
        self.polls = self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> Ledger:
        threading.Thread(target=self._run, name="ledger", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> bool:
        try:
            with self._lock:
                c = _ro(self.db)
                try:
                    c.execute("BEGIN")  # one snapshot of both tables
                    ob = c.execute("SELECT msg_id, kind, state FROM cloud_sync_outbox"
                                   ).fetchall()
                    sm = c.execute("SELECT sample_id, shared, queued, source FROM samples"
                                   ).fetchall()
                finally:
                    c.close()
                for mid, kind, state in ob:
                    self.outbox[mid] = {"kind": kind, "state": state}
                for sid, shared, queued, source in sm:
                    self.samples[sid] = {"shared": shared, "queued": queued,
                                         "source": source}
                self.polls += 1
            return True
        except sqlite3.Error as err:  # not created yet, or busy: the next poll sees it
            self.errors += 1
            logger.debug("ledger poll: %s", err)
            return False

    def pending(self) -> tuple[int, int]:
        """(outbox rows not acked nor rejected, samples not yet queued) now."""
        c = _ro(self.db)
        try:
            p = c.execute("SELECT count(*) FROM cloud_sync_outbox WHERE state = 'pending'"
                          ).fetchone()[0]
            u = c.execute("SELECT count(*) FROM samples WHERE queued IS NULL").fetchone()[0]
        finally:
            c.close()
        return p, u

    def produced(self) -> dict[str, set[str]]:
        """msg_ids the cloud must get, by kind, and the samples kept home."""
        with self._lock:
            fb_rows = {m for m, r in self.outbox.items() if r["kind"] == "feedback"}
            home = {s for s, r in self.samples.items()
                    if r["shared"] in HOME or (r["queued"] is not None and r["shared"] is None
                                               and s not in fb_rows)}
            return {
                "samples": (set(self.samples) | fb_rows) - home,
                "events": {m for m, r in self.outbox.items() if r["kind"] == "event"},
                "samples_home": home,
                "rejected": {m for m, r in self.outbox.items() if r["state"] == "rejected"},
                "pending": {m for m, r in self.outbox.items() if r["state"] == "pending"},
                "unqueued": {s for s, r in self.samples.items() if r["queued"] is None},
            }

    def sources(self) -> Counter:
        with self._lock:
            return Counter(r["source"] for r in self.samples.values())

    def event_types(self) -> Counter:
        """Types of the events in node.db now (pruned ones are gone: indicative)."""
        c = _ro(self.db)
        try:
            rows = c.execute("SELECT payload FROM cloud_sync_outbox WHERE kind = 'event'"
                             ).fetchall()
        finally:
            c.close()
        out: Counter = Counter()
        for (p,) in rows:
            try:
                out[json.loads(p).get("type")] += 1
            except ValueError:
                pass
        return out


# -- arrived: the AppStore's database -------------------------------------------
def arrived(cloud_db: Path, node_id: str) -> dict:
    c = _ro(cloud_db)
    try:
        fb = [r[0] for r in c.execute("SELECT msg_id FROM feedback WHERE node_id = ?",
                                      [node_id])]
        ev = [r[0] for r in c.execute("SELECT msg_id FROM events WHERE node_id = ?",
                                      [node_id])]
        dup_sid = c.execute("SELECT count(*) FROM (SELECT sample_id FROM feedback WHERE "
                            "node_id = ? GROUP BY sample_id HAVING count(*) > 1)",
                            [node_id]).fetchone()[0]
        types = Counter(r[0] for r in c.execute("SELECT type FROM events WHERE node_id = ?",
                                                [node_id]))
    finally:
        c.close()
    return {"samples": fb, "events": ev, "dup_sample_ids": dup_sid, "event_types": types}


def labels(node_db: Path, cloud_db: Path, node_id: str) -> dict:
    """Labels given on site (node.db) against the labels the AppStore holds for those
    samples: a label committed at the edge must reach the cloud too."""
    c = _ro(node_db)
    try:
        edge = dict(c.execute("SELECT sample_id, label FROM samples WHERE label IS NOT NULL "
                              "AND coalesce(shared, '') != 'none'").fetchall())
        results = dict(c.execute("SELECT source, count(*) FROM results GROUP BY source"
                                 ).fetchall())
    finally:
        c.close()
    c = _ro(cloud_db)
    try:
        cloud = dict(c.execute("SELECT sample_id, label FROM feedback WHERE node_id = ? AND "
                               "label IS NOT NULL", [node_id]).fetchall())
    finally:
        c.close()
    missing = sorted(sid for sid, lab in edge.items() if cloud.get(sid) != lab)
    return {"labelled_at_edge": len(edge), "same_in_cloud": len(edge) - len(missing),
            "missing_in_cloud": len(missing), "missing_ids": missing[:20],
            "results_by_source": results}


# -- load --------------------------------------------------------------------------
class Load(Background):
    """HTTP classification requests of held-out digits (and blends of two) as PNG."""

    name = "load"

    def __init__(self, edge: str, sample_dir: Path, rate: float, seed: int) -> None:
        super().__init__()
        import numpy as np

        from appstore.samples.digits import digit_png
        from stack import doubtful_digits

        rng = np.random.default_rng(seed)
        with np.load(Path(sample_dir) / "heldout.npz") as z:
            X = z["X_test"]
        doubt = doubtful_digits(sample_dir, 50, seed + 1)
        self.images = [digit_png(doubt[k // 2] if k % 2 else X[rng.integers(len(X))])
                       for k in range(100)]
        self.url = f"{edge}/v2/models/digits/classify"
        self.rate = rate
        self.ok = self.failed = 0
        self.errors: Counter = Counter()

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            t = time.monotonic()
            status, _ = http("POST", self.url, self.images[k % len(self.images)],
                             timeout=5.0, ctype="image/png")
            k += 1
            if status == 200:
                self.ok += 1
            else:
                self.failed += 1
                self.errors[str(status) if status else "no answer"] += 1
            self._stop.wait(max(0.0, 1.0 / self.rate - (time.monotonic() - t)))


class Technician(Background):
    """A technician at the local web UI: every ``every`` s, the most useful
    unlabelled samples get a label (the model's answer) through the node's API,
    each a ``sample_labelled`` event to the cloud, and the newest open alarm is
    acknowledged (``alarm_acknowledged``)."""

    name = "technician"

    def __init__(self, edge: str, every: float = 1.0, batch: int = 2) -> None:
        super().__init__()
        self.edge, self.every, self.batch = edge, every, batch
        self.ok = self.failed = self.acks_ok = 0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            status, out = http("GET", f"{self.edge}/api/v1/labelling/queue?app=digits"
                               f"&limit={self.batch}", timeout=5.0)
            if status != 200:
                continue
            for item in out.get("queue") or []:
                label = (item.get("prediction") or {}).get("label") or "0"
                status, _ = http("PUT", f"{self.edge}/api/v1/samples/{item['sample_id']}/label",
                                 {"label": label, "by": "tech-1"}, timeout=5.0)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            # and acknowledges the newest open alarm, if any
            status, out = http("GET", f"{self.edge}/api/v1/alarms?state=open&limit=1",
                               timeout=5.0)
            for a in (out.get("alarms") or []) if status == 200 else []:
                status, _ = http("POST", f"{self.edge}/api/v1/alarms/{a['alarm_id']}/ack",
                                 {"by": "tech-1"}, timeout=5.0)
                self.acks_ok += status == 200


# -- faults ------------------------------------------------------------------------
class Chaos:
    """One fault every ``gap`` s (uniform) until ``duration`` s have passed; the kinds
    come in random order, each once before any comes again (a short run sees all)."""

    def __init__(self, s: Stack, kinds: list[str], duration: float, gap: tuple[float, float],
                 seed: int, broker_down: tuple[float, float] = (1.0, 6.0)) -> None:
        self.s, self.kinds, self.duration, self.gap = s, kinds, duration, gap
        self.broker_down = broker_down
        self.rng = random.Random(seed)
        self.log: list[dict] = []
        self._bag: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def start(self) -> Chaos:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()
        return self

    def join(self) -> None:
        if self._thread:
            self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def counts(self) -> dict[str, int]:
        c = Counter(e["kind"] for e in self.log if e["done"])
        return {k: c.get(k, 0) for k in self.kinds}

    def _recent(self, kind: str, window: float) -> int:
        now = time.monotonic() - self.t0
        return sum(1 for e in self.log if e["kind"] == kind and e["done"]
                   and now - e["t"] < window)

    def _run(self) -> None:
        end = self.t0 + self.duration
        while not self._stop.wait(self.rng.uniform(*self.gap)):
            if time.monotonic() >= end:
                return
            if not self._bag:  # every kind once, in a random order, then again
                self._bag = self.rng.sample(self.kinds, len(self.kinds))
            kind = self._bag.pop()
            # the worker's restart budget is 5 in 60 s: stay under it, a crash loop
            # of the only version would take the app down (another fault, another test)
            if kind == "worker_kill" and self._recent(kind, 60) >= 3:
                kind = self.rng.choice([k for k in self.kinds if k != "worker_kill"]
                                       or ["worker_kill"])
            entry = {"t": round(time.monotonic() - self.t0, 2), "kind": kind, "done": False}
            try:
                entry.update(getattr(self, kind)())
            except Exception as err:  # noqa: BLE001 - a failed injection is logged, not fatal
                entry["note"] = f"injection failed: {err}"
            self.log.append(entry)
            logger.info("chaos t=%6.1f %-15s %s", entry["t"], kind,
                        {k: v for k, v in entry.items() if k not in ("t", "kind")})

    def broker_stop(self) -> dict:
        down = round(self.rng.uniform(*self.broker_down), 2)
        self.s.restart_broker(down)
        return {"done": True, "down_s": down}

    def worker_kill(self) -> dict:
        pid = self.s.worker_pid()
        if not pid:
            return {"note": "no ready worker (the node is still recovering): skipped"}
        os.kill(pid, signal.SIGKILL)
        return {"done": True, "pid": pid}

    def link_half_open(self) -> dict:
        return {"done": True, "connections": self.s.proxy.freeze()}

    def agent_kill(self) -> dict:
        pid = self.s.service.pid
        if not pid:
            return {"note": "the agent is down (restarting): skipped"}
        os.kill(pid, signal.SIGKILL)
        return {"done": True, "pid": pid}


# -- the run -------------------------------------------------------------------------
def run(duration: float = 120.0, seed: int = 1, kinds: list[str] | None = None,
        rate: float = 5.0, gap: tuple[float, float] = (4.0, 12.0), stream_fps: float = 5.0,
        drain_s: float = 240.0, workdir: Path | None = None, node_over: dict | None = None,
        broker_down: tuple[float, float] = (1.0, 6.0), probe_every: float = 0.5,
        label_every: float = 1.0) -> dict:
    """One chaos run; the result (see the module doc). Brings the site up and down."""
    kinds = list(kinds or KINDS)
    over = {"feedback": {"max_per_minute": 100000},
            # a clear 7 on the camera raises an alarm, cleared 1.5 s after the last one
            "alarms": {"rules": [{"name": "seven", "app": "digits", "labels": ["7"],
                                  "min_score": 0.8, "n": 1, "m": 1, "clear_after_s": 1.5,
                                  "severity": "warning"}]},
            **(node_over or {})}
    workdir = Path(workdir or tempfile.mkdtemp(prefix="aidc-chaos-"))
    s = Stack(workdir, node_over=over, stream={"fps": stream_fps}, probe_every=probe_every)
    t_start = time.monotonic()
    load = chaos = ledger = tech = None
    try:
        s.up()
        ledger = Ledger(s.node_db).start()
        load = Load(s.edge, s.sample_dir, rate, seed).start()
        tech = Technician(s.edge, label_every).start() if label_every else None
        time.sleep(2.0)  # the stream and the load under way before the first fault
        logger.info("chaos: %g s of %s, seed %d", duration, ",".join(kinds), seed)
        chaos = Chaos(s, kinds, duration, gap, seed, broker_down).start()
        chaos.join()
        t_chaos = time.monotonic() - chaos.t0
        load.stop()
        if tech is not None:
            tech.stop()
        # the camera is unplugged: the stream goes offline at the end of its loop
        cam = s.dir / "camera.avi"
        cam.rename(cam.with_suffix(".unplugged"))
        logger.info("chaos over after %.0f s; draining", t_chaos)
        t_drain = time.monotonic()
        drained_s = None
        settled = 0
        end = t_drain + drain_s
        while time.monotonic() < end:
            try:
                p, u = ledger.pending()
            except sqlite3.Error:
                p = u = -1
            settled = settled + 1 if (p, u) == (0, 0) else 0
            if settled >= 3:  # empty three polls running (1.5 s): nothing more coming
                drained_s = round(time.monotonic() - t_drain, 1)
                break
            time.sleep(0.5)
        # the count: every produced id in the cloud, or the limit
        while True:
            ledger.poll()
            prod = ledger.produced()
            got = arrived(s.cloud_db, NODE_ID)
            # what the node committed by now: an id it produced after the poll above
            # may have arrived before the cloud was read (not extra, not yet counted)
            ledger.poll()
            seen = ledger.produced()
            missing = (prod["samples"] - set(got["samples"])) | \
                (prod["events"] - set(got["events"]))
            lab = labels(s.node_db, s.cloud_db, NODE_ID)
            if (not missing and not lab["missing_in_cloud"]) or time.monotonic() >= end:
                break
            time.sleep(1.0)
        ledger.stop()
        ingest = http("GET", f"{s.api}/stats", token=s.token)[1].get("ingest", {})
        node_types = ledger.event_types()
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
            "node_id": NODE_ID, "seed": seed, "duration_s": duration,
            "site_dir": str(workdir),  # kept: agent.log, broker.log, node.db, cloud/
            "chaos_s": round(t_chaos, 1), "drained_after_s": drained_s,
            "wall_s": round(time.monotonic() - t_start, 1),
            "load": {"http_rate_per_s": rate, "stream_fps": stream_fps,
                     "requests_answered": load.ok, "requests_failed": load.failed,
                     "request_errors": dict(load.errors),
                     "samples_by_source": dict(ledger.sources()),
                     "results_recorded_by_source": lab["results_by_source"],
                     # answered 200, its result still in the agent's memory when a kill -9
                     # came (results are written in batches every 0.2 s): never produced
                     "answered_not_recorded": max(0, load.ok - lab["results_by_source"].get(
                         "v2-classify", 0)),
                     "ledger_polls": ledger.polls},
            "faults": chaos.counts(),
            "faults_skipped": sum(1 for e in chaos.log if not e["done"]),
            "agent_starts": s.service.starts,
            "injections": chaos.log,
            "samples": _tally(prod["samples"], got["samples"], prod, got["dup_sample_ids"],
                              seen["samples"] | seen["samples_home"],
                              _dups(ingest, "feedback")),
            "events": _tally(prod["events"], got["events"], prod, 0, seen["events"],
                             _dups(ingest, "event")),
            "labels": {**{k: v for k, v in lab.items() if k != "results_by_source"},
                       "label_requests_ok": tech.ok if tech else 0,
                       "label_requests_failed": tech.failed if tech else 0,
                       "alarm_acks_ok": tech.acks_ok if tech else 0},
            "samples_kept_home": len(prod["samples_home"]),
            "event_types_cloud": dict(got["event_types"]),
            "event_types_node_db": dict(node_types),
            "ingest": ingest,
        }
        return result
    finally:
        for part in (load, tech, ledger):
            if part is not None:
                part.stop()
        if chaos is not None:
            chaos.stop()
        s.down()


def _dups(ingest: dict, kind: str) -> int:
    """Resends the AppStore recognised (``<kind>_duplicate``), by its ingest counters."""
    return sum(v for k, v in ingest.items() if k.startswith(kind) and k.endswith("_duplicate"))


def _tally(produced: set[str], got: list[str], prod: dict, dup_ids: int, seen: set[str],
           resends: int) -> dict:
    """``produced``: the ids that must have arrived (committed before the cloud was
    read); ``seen``: every id committed by the end (extra: arrived, not among them)."""
    got_set = set(got)
    lost = produced - got_set
    return {
        "produced": len(produced), "arrived": len(got_set & produced),
        # committed just after the count's snapshot of node.db and already in the cloud
        "arrived_after_the_count": len(got_set & (seen - produced)),
        "lost": len(lost),
        "lost_still_pending": len(lost & prod["pending"]),
        "lost_rejected": len(lost & prod["rejected"]),
        "lost_never_queued": len(lost & prod["unqueued"]),
        "duplicated": (len(got) - len(got_set)) + dup_ids,
        "extra": len(got_set - produced - seen),
        "resends_deduplicated": resends,
        "lost_ids": sorted(lost)[:20],
    }


def summary(r: dict) -> str:
    f = ", ".join(f"{k} {v}" for k, v in r["faults"].items())
    out = [(f"chaos run: {r['chaos_s']:.0f} s of faults (seed {r['seed']}): {f}"
            f" ({sum(r['faults'].values())} in all, {r['faults_skipped']} skipped); "
            f"agent started {r['agent_starts']} times"),
           (f"load: {r['load']['requests_answered']} HTTP requests answered, "
            f"{r['load']['requests_failed']} failed; samples by source "
            f"{r['load']['samples_by_source']}; drained {r['drained_after_s']} s after"),
           "",
           ("| | produced at the edge | arrived in the cloud | lost | duplicated | extra | "
            "resends deduplicated |"),
           "|---|---|---|---|---|---|---|"]
    for k in ("samples", "events"):
        t = r[k]
        out.append(f"| {k} | {t['produced']} | {t['arrived']} | {t['lost']} | "
                   f"{t['duplicated']} | {t['extra']} | {t['resends_deduplicated']} |")
    lb = r["labels"]
    out.append(f"\nlabels given on site: {lb['labelled_at_edge']}, the same in the cloud: "
               f"{lb['same_in_cloud']}, missing: {lb['missing_in_cloud']}; results answered "
               f"but not recorded (in memory at a kill -9): {r['load']['answered_not_recorded']}")
    return "\n".join(out)


def ok(r: dict) -> bool:
    return all(r[k]["lost"] == 0 and r[k]["duplicated"] == 0 for k in ("samples", "events")) \
        and r["labels"]["missing_in_cloud"] == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default=",".join(KINDS), help="comma-separated kinds")
    ap.add_argument("--rate", type=float, default=5.0, help="HTTP requests a second")
    ap.add_argument("--stream-fps", type=float, default=5.0)
    ap.add_argument("--gap", default="4,12", help="seconds between faults: min,max")
    ap.add_argument("--drain-s", type=float, default=240.0)
    ap.add_argument("--label-every", type=float, default=1.0,
                    help="seconds between a technician's labels (0: none)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("appstore", "edge_node", "cloud_sync", "werkzeug", "bench.stack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kinds = [k for k in args.faults.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
    gap = tuple(float(x) for x in args.gap.split(","))
    r = run(args.duration, args.seed, kinds, args.rate, gap, args.stream_fps, args.drain_s,
            label_every=args.label_every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(summary(r))
    print(f"\n{'no sample or event lost' if ok(r) else 'LOSS OR DUPLICATION'}; "
          f"results in {args.out}")
    return 0 if ok(r) else 1


if __name__ == "__main__":
    sys.exit(main())
