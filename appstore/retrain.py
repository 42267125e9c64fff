"""Learning from the fleet: one dataset per app, retrained into a new version.

**Dataset.** Every labelled sample the sites share (upload level ``full``)
lands in the ``feedback`` table; the dataset of an app is those samples
deduplicated by the sha256 of their input (the same image from two cameras, or
sent twice, counts once), each item with its provenance (which nodes and
samples gave it, with which label). An item's label is the sites' majority; a
tie is a *conflict*: the item is left out and counted. Items are split into
training and held-out by their content hash (20 % held out), so a duplicate
can never sit on both sides.

**Retrain.** ``POST /api/v1/apps/<app>/retrain`` (``aidc store retrain``)
takes a published version as the base, runs the same head training the nodes
run (:mod:`edge_node.learning.site_job`, as a child process) on the dataset
plus the package's replay set, judges the candidate on the held-out items and
the replay set with the same gate (:mod:`edge_node.learning.gate`, the base
package's ``learning.gate``), and when it passes builds, signs and publishes
``<app> <version>`` with ``retrain.json`` (lineage: base, dataset items per
site, metrics) inside the package, then assigns it to the nodes asked for.
A refused candidate is recorded with the reason; nothing is published.

**Features-only items.** A site at upload level ``features`` shares the vector
the head consumes instead of its input; its items are keyed by the model's
sha256 and the vector's. They can train the head only when that model is the
base version's (the vectors of another model mean something else): those are
used, as extra training and held-out rows, by :mod:`appstore.feature_job`
(the same training, with the items that have inputs turned into features by
the same extractor); the others are skipped and the retrain's lineage says how
many and why. With no usable features-only item the node's job runs as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from cloud_sync.package import read_package

from .errors import BadRequest, Conflict, NotFound

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.2
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "tensor/npy": "npy"}
FEATURES_EXT = "f32"


def heldout(sha256: str, fraction: float = HELDOUT_FRACTION) -> bool:
    return int(sha256[:8], 16) / 0xFFFFFFFF < fraction


class Datasets:
    """The per-app datasets, computed from the stored feedback."""

    def __init__(self, store: Any, samples: Any) -> None:
        self.store = store
        self.samples = samples  # ContentStore of the inputs

    def items(self, app: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``(items, stats)``: one item per distinct input, labelled by the sites."""
        with self.store.read() as db:
            rows = list(db.query(
                "select node_id, sample_id, input_sha256, input_type, label, labelled_by, "
                "shared, features_sha256, feature_tensor, n_features, head_node, "
                "model_version, model_sha256 from feedback where app = ? "
                "order by received_at", [app]))
        by_sha: dict[str, list[dict]] = defaultdict(list)
        sites: dict[str, Counter] = defaultdict(Counter)
        for r in rows:
            s = sites[r["node_id"]]
            s["samples"] += 1
            s["labelled"] += r["label"] is not None
            s[f"shared_{r['shared'] or 'full'}"] += 1
            if r["input_sha256"]:
                by_sha[r["input_sha256"]].append(r)
            elif r["features_sha256"]:  # the same vector from the same model: one item
                by_sha[features_key(r["model_sha256"], r["features_sha256"])].append(r)
        items, conflicts, unlabelled = [], 0, 0
        for sha, group in by_sha.items():
            votes = Counter(r["label"] for r in group if r["label"] is not None)
            if not votes:
                unlabelled += 1
                continue
            (top, n), *rest = votes.most_common()
            if rest and rest[0][1] == n:
                conflicts += 1
                continue
            first = group[0]
            item: dict[str, Any] = {"sha256": sha, "kind": "input",
                                    "input_type": first["input_type"]}
            if first["input_sha256"]:
                path = self.samples.path(sha, IMAGE_TYPES.get(first["input_type"], ""))
            else:
                path = self.samples.path(first["features_sha256"], FEATURES_EXT)
                item["kind"] = "features"
                item["features"] = {"sha256": first["features_sha256"],
                                    "tensor": first["feature_tensor"],
                                    "n": first["n_features"], "head": first["head_node"],
                                    "model_version": first["model_version"],
                                    "model_sha256": first["model_sha256"]}
            if path is None:
                continue
            items.append({**item, "path": str(path), "label": top, "votes": dict(votes),
                          "heldout": heldout(sha),
                          "provenance": [{"node": r["node_id"], "sample_id": r["sample_id"],
                                          "label": r["label"]} for r in group]})
        stats = {"app": app, "samples": len(rows), "items": len(items),
                 "duplicates": sum(len(g) - 1 for g in by_sha.values()),
                 "conflicts": conflicts, "unlabelled": unlabelled,
                 "metadata_only": sum(1 for r in rows if not r["input_sha256"]
                                      and not r["features_sha256"]),
                 "features_only": sum(1 for r in rows if r["features_sha256"]),
                 "kinds": dict(Counter(i["kind"] for i in items)),
                 "features_by_model": _by_model(items),
                 "heldout": sum(1 for i in items if i["heldout"]),
                 "labels": dict(Counter(i["label"] for i in items)),
                 "sites": {n: dict(c) for n, c in sites.items()}}
        return items, stats


def features_key(model_sha256: str | None, features_sha256: str) -> str:
    """A features-only item's id: its vector within the model that computed it."""
    return hashlib.sha256(f"{model_sha256}:{features_sha256}".encode()).hexdigest()


def _by_model(items: list[dict]) -> dict[str, dict]:
    """Features-only items per model sha256: its version(s) and how many."""
    out: dict[str, dict] = {}
    for i in items:
        if i["kind"] == "features":
            f = i["features"]
            m = out.setdefault(f["model_sha256"] or "?", {"versions": [], "items": 0})
            m["items"] += 1
            if f["model_version"] not in m["versions"]:
                m["versions"].append(f["model_version"])
    return out


def split_features(items: list[dict], model_sha256: str, base_version: str
                   ) -> tuple[list[dict], dict[str, Any]]:
    """The items a retrain from the base model (``model_sha256``) can use, and the
    features-only items it cannot: ``{"used", "skipped", "reasons": {why: n}}``."""
    keep, reasons = [], Counter()
    used = 0
    for i in items:
        if i["kind"] != "features":
            keep.append(i)
            continue
        f = i["features"]
        if f["model_sha256"] != model_sha256:
            reasons[f"made by another model ({f['model_version']}, sha256 "
                    f"{(f['model_sha256'] or '?')[:12]}), not {base_version}'s "
                    f"({model_sha256[:12]}): feature vectors are only comparable within "
                    "one model"] += 1
            continue
        used += 1
        keep.append(i)
    return keep, {"used": used, "skipped": sum(reasons.values()), "reasons": dict(reasons)}


class Retrainer:
    """Runs retrains one at a time on a background thread."""

    def __init__(self, cfg: Any, store: Any, catalog: Any, datasets: Datasets, key: Any,
                 fleet: Any) -> None:
        self.cfg, self.store, self.catalog = cfg, store, catalog
        self.datasets, self.key, self.fleet = datasets, key, fleet
        self.dir = cfg.data_dir / "retrains"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- requests ----------------------------------------------------------------
    def request(self, app: str, base_version: str, version: str, assign: list[str],
                by: str | None = None, config: dict | None = None) -> dict[str, Any]:
        base = self.catalog.get_version(app, base_version)  # NotFound
        if self.catalog._find(app, version) is not None:
            raise Conflict("version_exists", f"{app} {version} is already published; "
                           "name a new version")
        from cloud_sync.manifest import SEMVER_RE

        if not SEMVER_RE.match(version):
            raise BadRequest("bad_version", f"{version!r} is not semver (MAJOR.MINOR.PATCH)")
        items, stats = self.datasets.items(app)
        items, stats["features_retrain"] = split_features(
            items, self._model_sha256(base), base_version)
        gate = (base["manifest"].get("learning") or {}).get("gate") or {}
        need_train, need_held = gate.get("min_samples", 20), gate.get("min_heldout", 10)
        n_train = sum(1 for i in items if not i["heldout"])
        n_held = sum(1 for i in items if i["heldout"])
        if n_train < need_train or n_held < need_held:
            raise Conflict("not_enough_samples", {
                "train": n_train, "heldout": n_held,
                "need": {"train": need_train, "heldout": need_held},
                "features_skipped": stats["features_retrain"],
                "hint": "sites label more samples (and share them: upload level full, or "
                        "features computed by the base version's model)"})
        with self._lock, self.store.write() as db:
            busy = list(db.query("select retrain_id from retrains where app = ? and state = "
                                 "'running'", [app]))
            if busy:
                raise Conflict("retrain_running", {"retrain_id": busy[0]["retrain_id"]})
            rid = f"rt-{app}-{uuid.uuid4().hex[:8]}"
            now = time.time()
            db["retrains"].insert({
                "retrain_id": rid, "app": app, "base_version": base_version,
                "version": version, "state": "running", "reason": None, "requested_by": by,
                "created_at": now, "updated_at": now, "assign": json.dumps(assign),
                "metrics": None, "lineage": None, "sha256": None})
        t = threading.Thread(target=self._run, args=(rid, app, base, version, items, stats,
                                                     assign, config or {}),
                             name=f"retrain-{app}", daemon=True)
        self._threads.append(t)
        t.start()
        return self.get(rid)

    def _model_sha256(self, base: dict) -> str:
        """sha256 of the base version's model file (what features-only items must match)."""
        pkg = read_package(self.catalog.blob_path(base["sha256"]),
                           self.catalog.trusted_keys(), expected_sha256=base["sha256"])
        return hashlib.sha256(pkg.members[pkg.manifest.model.file]).hexdigest()

    def get(self, rid: str) -> dict[str, Any]:
        with self.store.read() as db:
            rows = list(db.query("select * from retrains where retrain_id = ?", [rid]))
        if not rows:
            raise NotFound("unknown_retrain", f"no retrain {rid!r}")
        return _row(rows[0])

    def list(self, app: str | None = None) -> list[dict[str, Any]]:
        sql, args = "select * from retrains", []
        if app:
            sql, args = sql + " where app = ?", [app]
        with self.store.read() as db:
            return [_row(r) for r in db.query(sql + " order by created_at desc limit 100", args)]

    def _update(self, rid: str, **fields: Any) -> None:
        for k in ("metrics", "lineage"):
            if k in fields and not isinstance(fields[k], str):
                fields[k] = json.dumps(fields[k])
        with self.store.write() as db:
            db["retrains"].update(rid, {**fields, "updated_at": time.time()})

    # -- the work ---------------------------------------------------------------
    def _run(self, rid: str, app: str, base: dict, version: str, items: list[dict],
             stats: dict, assign: list[str], config: dict) -> None:
        work = self.dir / rid
        try:
            self._retrain(rid, app, base, version, items, stats, assign, config, work)
        except Exception as err:  # noqa: BLE001 - a retrain ends in a state, never hangs
            logger.exception("retrain %s", rid)
            self._update(rid, state="failed", reason=f"{type(err).__name__}: {err}"[:500])
        finally:
            shutil.rmtree(work / "job", ignore_errors=True)

    def _retrain(self, rid, app, base, version, items, stats, assign, config, work) -> None:
        from edge_node.learning.gate import decide

        work.mkdir(parents=True, exist_ok=True)
        pkg = read_package(self.catalog.blob_path(base["sha256"]),
                           self.catalog.trusted_keys(), expected_sha256=base["sha256"])
        app_dir = work / "base"
        shutil.rmtree(app_dir, ignore_errors=True)
        app_dir.mkdir(parents=True)
        for name, data in pkg.members.items():
            (app_dir / name).write_bytes(data)
        m = pkg.manifest
        labels = pkg.labels or []
        usable = [i for i in items if i["label"] in labels]
        listing = {"samples": [{"sample_id": i["sha256"], "path": i["path"],
                                "input_type": i["input_type"],
                                "label_index": labels.index(i["label"]),
                                "heldout": i["heldout"]} for i in usable
                               if i["kind"] == "input"]}
        feats = {"samples": [{"sample_id": i["sha256"], "path": i["path"],
                              "label_index": labels.index(i["label"]),
                              "heldout": i["heldout"]} for i in usable
                             if i["kind"] == "features"]}
        feat = {**stats.get("features_retrain", {}), "used": len(feats["samples"])}
        self._update(rid, metrics={"features": feat})  # said even if the job fails
        (work / "samples.json").write_text(json.dumps(listing))
        out = work / "candidate"
        shutil.rmtree(out, ignore_errors=True)
        if feats["samples"]:  # features-only rows: the head trains on features directly
            (work / "features.json").write_text(json.dumps(feats))
            cmd = [sys.executable, "-m", "appstore.feature_job", "--app-dir", str(app_dir),
                   "--samples-list", str(work / "samples.json"),
                   "--features-list", str(work / "features.json"), "--out", str(out),
                   "--work", str(work / "job" / "data"), "--threads", "1"]
        else:
            cmd = [sys.executable, "-m", "edge_node.learning.site_job", "--app-dir",
                   str(app_dir), "--samples-list", str(work / "samples.json"), "--out",
                   str(out), "--checkpoint-dir", str(work / "job" / "checkpoints"),
                   "--threads", "1"]
        if m.learning.replay:
            cmd += ["--replay", str(app_dir / m.learning.replay)]
        for k, v in config.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        (work / "job" / "checkpoints").mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                              cwd=work / "job")
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            reason = " / ".join(tail) or f"exit {proc.returncode}"
            self._update(rid, state="failed", reason=reason[:500])
            return
        gate_doc = json.loads((out / "gate.json").read_text())
        ft = json.loads((out / "finetune.json").read_text())
        acc = gate_doc["accuracy"]
        metrics = {k: {f: acc.get(k, {}).get(f) for f in ("n", "base", "candidate")}
                   for k in ("heldout", "replay")}
        metrics.update(layers=len(ft.get("layers") or [1]),
                       candidates=gate_doc.get("candidates"),
                       train_s=ft["training"]["train_s"], wall_s=round(time.monotonic() - t0, 2),
                       skipped=len(gate_doc["prepared"]["skipped"]),
                       features=feat)
        by_site = Counter(p["node"] for i in usable for p in i["provenance"])
        lineage = {"base": {"version": base["version"], "sha256": base["sha256"]},
                   "dataset": {**{k: stats[k] for k in ("items", "duplicates", "conflicts",
                                                        "heldout")},
                               "used": len(usable), "by_site": dict(by_site),
                               "features": feat},
                   "model_sha256": ft["model"]["sha256"], "config": config,
                   "retrain_id": rid}
        self._update(rid, metrics=metrics, lineage=lineage)
        passed, reason = decide(m.learning.gate, acc)
        if not passed:
            self._update(rid, state="rejected", reason=reason)
            return
        sha = self._publish(app_dir, pkg, out / ft["model"]["file"], version, lineage, metrics,
                            work)
        self._update(rid, state="published", reason=reason, sha256=sha)
        for node in assign:
            try:
                self.fleet.assign(node, app, version)
            except Exception as err:  # noqa: BLE001 - one node must not undo the rest
                logger.warning("retrain %s: assigning %s to %s failed: %s", rid, version,
                               node, err)

    def _publish(self, app_dir: Path, pkg: Any, model: Path, version: str, lineage: dict,
                 metrics: dict, work: Path) -> str:
        from .publish import build_package

        manifest = json.loads(pkg.members["manifest.json"])
        manifest["version"] = version
        labels = None
        pp = manifest.get("postprocess") or {}
        if pp.get("labels_file"):
            labels = app_dir / pp["labels_file"]
        extra = work / "retrain.json"
        extra.write_text(json.dumps({"lineage": lineage, "metrics": metrics}, indent=1))
        extras = [extra]
        replay = (manifest.get("learning") or {}).get("replay")
        if replay:
            extras.append(app_dir / replay)
        out = work / f"{manifest['name']}-{version}.aidc"
        build_package(model, manifest, labels, self.key, out, extra_files=extras)
        row, _ = self.catalog.add_package_file(out)
        return row["sha256"]

    def join(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    for k in ("metrics", "lineage", "assign"):
        r[k] = json.loads(r[k]) if r.get(k) else None
    return r
