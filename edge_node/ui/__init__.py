"""The node's local web UI: static pages over the local REST API (no build step).

``/ui/labelling`` is the technician's labelling page (docs/learning.md),
``/ui/alarms`` the alarms page (docs/alarms.md), ``/ui/health`` the health page
(docs/faults.md: the checks now with "Run the checks now" and "Fix what fails",
the faults open now, the fault journal); they only call the node's own API
(``/api/v1``, ``/api/faults``, ``/api/doctor``) from the browser and fetch nothing
from the internet, so they work on a site box with no way out.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, redirect, send_from_directory

STATIC = Path(__file__).parent / "static"


def make_ui_blueprint() -> Blueprint:
    bp = Blueprint("ui", __name__, url_prefix="/ui", static_folder=str(STATIC),
                   static_url_path="/static")

    @bp.get("/")
    def index():
        return redirect("/ui/labelling")

    @bp.get("/labelling")
    def labelling():
        return send_from_directory(STATIC, "labelling.html")

    @bp.get("/alarms")
    def alarms():
        return send_from_directory(STATIC, "alarms.html")

    @bp.get("/health")
    def health():
        return send_from_directory(STATIC, "health.html")

    return bp
