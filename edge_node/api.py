"""The node's local REST API (JSON) next to the v2 inference protocol."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request


def make_local_blueprint(agent: Any) -> Blueprint:
    bp = Blueprint("local_api", __name__, url_prefix="/api/v1")

    @bp.get("/status")
    def status():
        return jsonify(agent.status())

    @bp.get("/samples")
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

    return bp
