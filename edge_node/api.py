"""The node's local REST API (JSON) next to the v2 inference protocol."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from .adapt import AdaptError
from .alarms import STATES, AlarmError
from .alarms import public as public_alarm
from .labelling import LabelError, public
from .metrics import render
from .scheduling.jobs import UnknownJob


def make_local_blueprint(agent: Any) -> Blueprint:
    bp = Blueprint("local_api", __name__)

    @bp.get("/metrics")
    def metrics():
        body, ctype = render(agent.metrics)
        return Response(body, content_type=ctype)

    @bp.get("/api/v1/status")
    def status():
        return jsonify(agent.status())

    @bp.get("/api/faults")
    def faults():
        """The fault journal (docs/faults.md): per kind counts and times, the faults
        open now, and the newest journal rows (?kind=&limit=, at most 1000)."""
        limit = _int_arg("limit", 100, 1, 1000)
        kind = request.args.get("kind") or None
        block = agent.faults_block()
        try:
            recent = agent.fault_journal.recent(limit=limit, kind=kind)
        except Exception as err:  # noqa: BLE001 - node.db damaged: say so, with what is known
            return jsonify(error="journal_unreadable", detail=str(err),
                           open=block.get("open", {})), 503
        if "error" in block:
            return jsonify(error="journal_unreadable", detail=block["error"],
                           open=block.get("open", {})), 503
        return jsonify(summary=block.get("kinds", {}), open=block.get("open", {}),
                       detected=block.get("detected"), healed=block.get("healed"),
                       unhealed=block.get("unhealed"), recent=recent)

    @bp.get("/api/doctor")
    def doctor():
        """Every health check now, no remedy applied."""
        return jsonify(agent.doctor(fix=False))

    @bp.post("/api/doctor")
    def doctor_fix():
        """Every health check now; each failing one's remedy applied (``aidc edge
        doctor --fix``)."""
        return jsonify(agent.doctor(fix=True))

    def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
        try:
            return min(hi, max(lo, int(request.args.get(name, default))))
        except ValueError:
            raise LabelError(400, "bad_request", f"{name} must be an integer") from None

    @bp.errorhandler(LabelError)
    def _label_error(err: LabelError):
        return jsonify(error=err.reason, detail=err.detail), err.status

    @bp.get("/api/v1/samples")
    def samples():
        """Kept samples: ?app=&state=unlabelled|labelled|all&order=newest|usefulness
        &heldout=true|false&limit=&offset="""
        a = request.args
        state, order = a.get("state", "all"), a.get("order", "newest")
        if state not in ("all", "labelled", "unlabelled"):
            raise LabelError(400, "bad_request", "state is one of all, labelled, unlabelled")
        if order not in ("newest", "usefulness"):
            raise LabelError(400, "bad_request", "order is newest or usefulness")
        heldout = {"true": True, "false": False, None: None}.get(a.get("heldout"), "bad")
        if heldout == "bad":
            raise LabelError(400, "bad_request", "heldout is true or false")
        rows = agent.store.query_samples(
            app=a.get("app"), state=state, order=order, heldout=heldout,
            limit=_int_arg("limit", 100, 1, 1000), offset=_int_arg("offset", 0, 0, 10**9))
        out = []
        for r in rows:
            p = public(r)
            p["outbox"] = agent.outbox.status(r["msg_id"])
            out.append(p)
        return jsonify(samples=out, counts=agent.store.sample_counts())

    @bp.get("/api/v1/labelling/queue")
    def labelling_queue():
        """The next samples to label, most useful first (?app=&limit=)."""
        rows = agent.store.query_samples(app=request.args.get("app"), state="unlabelled",
                                         order="usefulness",
                                         limit=_int_arg("limit", 20, 1, 200))
        items = []
        for r in rows:
            p = public(r)
            n = len(json.loads(r["scores"])) if r.get("scores") else 0
            p["classes"] = agent.labeller.classes(r["app"], n)
            items.append(p)
        return jsonify(queue=items, counts=agent.store.sample_counts())

    @bp.get("/api/v1/samples/<sample_id>")
    def sample(sample_id: str):
        return jsonify(public(agent.labeller.get(sample_id)))

    @bp.get("/api/v1/samples/<sample_id>/input")
    def sample_input(sample_id: str):
        """The stored input (?format=png renders an image-shaped tensor)."""
        data, ctype = agent.labeller.input(sample_id, request.args.get("format") == "png")
        return Response(data, content_type=ctype)

    @bp.put("/api/v1/samples/<sample_id>/label")
    def label_sample(sample_id: str):
        """{"label": "7", "by": "tech-1", "overwrite": false}"""
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise LabelError(400, "bad_json", 'expected {"label": "...", "by": "..."}')
        row = agent.labeller.label(sample_id, body.get("label"), body.get("by"),
                                   bool(body.get("overwrite", False)))
        return jsonify(public(row))

    @bp.errorhandler(AdaptError)
    def _adapt_error(err: AdaptError):
        return jsonify(error=err.reason, detail=err.detail), err.status

    def _body() -> dict:
        body = request.get_json(silent=True) if request.data else {}
        if not isinstance(body, dict):
            raise AdaptError(400, "bad_json", "expected a JSON object")
        return body

    @bp.post("/api/v1/apps/<app>/finetune")
    def finetune(app: str):
        """Fine-tune ``app`` on its labelled samples: {"by": "tech-1", "config": {"l2": 0.001}}"""
        body = _body()
        config = body.get("config") or {}
        allowed = {"l2", "replay_weight", "class_weight", "max_iter", "patience", "seed"}
        if not isinstance(config, dict) or set(config) - allowed:
            raise AdaptError(400, "bad_config", f"config keys are {sorted(allowed)}")
        return jsonify(agent.adapt.request(app, body.get("by"), config)), 202

    @bp.post("/api/v1/apps/<app>/rollback")
    def rollback(app: str):
        """Back to the package's model: {"by": "tech-1"}"""
        return jsonify(agent.adapt.rollback(app, _body().get("by")))

    @bp.get("/api/v1/finetune")
    def finetune_runs():
        return jsonify(agent.adapt.status(request.args.get("app")))

    @bp.get("/api/v1/finetune/<run_id>")
    def finetune_run(run_id: str):
        run = agent.store.get_run(run_id)
        if run is None:
            raise AdaptError(404, "unknown_run", f"no fine-tune run {run_id!r}")
        return jsonify(run)

    @bp.get("/api/v1/telemetry")
    def telemetry():
        """Per app: field accuracy on labelled samples (by version and day), samples
        kept/labelled/shared, fine-tune outcomes (what the cloud gets, plus days)."""
        return jsonify(agent.telemetry.local())

    @bp.errorhandler(AlarmError)
    def _alarm_error(err: AlarmError):
        body = {"error": err.reason, "detail": err.detail}
        if err.state is not None:
            body["state"] = err.state
        return jsonify(body), err.status

    @bp.get("/api/v1/alarms")
    def alarms():
        """Newest first: ?state=open|acknowledged|resolved|false_alarm|cleared|active&limit="""
        state = request.args.get("state")
        if state is not None and state not in STATES + ("active",):
            raise AlarmError(400, "bad_request", f"state is one of {', '.join(STATES)}, active")
        try:
            limit = min(1000, max(1, int(request.args.get("limit", 100))))
        except ValueError:
            raise AlarmError(400, "bad_request", "limit must be an integer") from None
        states = ("open", "acknowledged") if state == "active" else (state,) if state else None
        rows = agent.store.query_alarms(states, limit)
        return jsonify(alarms=[public_alarm(r) for r in rows], counts=agent.store.alarm_counts())

    @bp.get("/api/v1/alarms/<alarm_id>")
    def alarm(alarm_id: str):
        """One alarm, with its app's classes (what a false alarm may be labelled)."""
        out = public_alarm(agent.alarms.get(alarm_id))
        out["classes"] = agent.labeller.classes(
            out["app"], len((out["result"] or {}).get("scores") or []))
        return jsonify(out)

    @bp.get("/api/v1/alarms/<alarm_id>/evidence")
    def alarm_evidence(alarm_id: str):
        """The frame that raised the alarm (PNG)."""
        return Response(agent.alarms.evidence(alarm_id), content_type="image/png")

    def _alarm_body(*optional: str) -> dict:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise AlarmError(400, "bad_json", 'expected a JSON object: {"by": "tech-1", ...}')
        by = body.get("by")
        if not isinstance(by, str) or not by.strip() or len(by) > 64:
            raise AlarmError(400, "bad_request", "by (who did it) is a string of 1-64 characters")
        unknown = set(body) - {"by", *optional}
        if unknown:
            raise AlarmError(400, "bad_request", f"unknown keys {sorted(unknown)}; this takes "
                             f"{sorted({'by', *optional})}")
        for key in optional:
            v = body.get(key)
            if v is not None and (not isinstance(v, str) or not v.strip() or len(v) > 2000):
                raise AlarmError(400, "bad_request", f"{key} is a non-empty string")
        return {"by": by.strip(), **{k: (body[k].strip() if body.get(k) else None)
                                     for k in optional}}

    @bp.post("/api/v1/alarms/<alarm_id>/ack")
    def alarm_ack(alarm_id: str):
        """{"by": "tech-1"}"""
        agent.alarms.get(alarm_id)  # 404 before 400
        return jsonify(public_alarm(agent.alarms.act(alarm_id, "ack", **_alarm_body())))

    @bp.post("/api/v1/alarms/<alarm_id>/resolve")
    def alarm_resolve(alarm_id: str):
        """{"by": "tech-1", "note": "..."}"""
        agent.alarms.get(alarm_id)
        return jsonify(public_alarm(agent.alarms.act(alarm_id, "resolve",
                                                     **_alarm_body("note"))))

    @bp.post("/api/v1/alarms/<alarm_id>/false-alarm")
    def alarm_false(alarm_id: str):
        """{"by": "tech-1", "label": "1"} (label: the correct class, optional)"""
        agent.alarms.get(alarm_id)
        return jsonify(public_alarm(agent.alarms.act(alarm_id, "false_alarm",
                                                     **_alarm_body("label"))))

    @bp.get("/api/v1/training")
    def training():
        """Windows, what each card grants training now, and the jobs."""
        return jsonify({**agent.scheduler.status(),
                        "jobs": [j.to_dict() for j in agent.jobs.list()]})

    @bp.post("/api/v1/training/jobs/<job_id>/cancel")
    def cancel_job(job_id: str):
        try:
            agent.jobs.get(job_id)
        except UnknownJob:
            return jsonify(error="unknown_job", detail=job_id), 404
        agent.scheduler.cancel(job_id)
        return jsonify(ok=True)

    return bp
