"""The node's local REST API (JSON) next to the v2 inference protocol."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

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

    @bp.get("/api/v1/samples")
    def samples():
        app = request.args.get("app")
        try:
            limit = min(1000, max(1, int(request.args.get("limit", 100))))
        except ValueError:
            return jsonify(error="bad_request", detail="limit must be an integer"), 400
        rows = agent.store.samples(app=app, limit=limit)
        for r in rows:
            r["outbox"] = agent.outbox.status(r["msg_id"])
        return jsonify(samples=rows)

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
