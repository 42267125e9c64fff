"""The node's local web UI: static pages over the local REST API (no build step).

``/ui/labelling`` is the technician's labelling page (docs/learning.md),
``/ui/alarms`` the alarms page (docs/alarms.md); they only call ``/api/v1`` from
the browser and fetch nothing from the internet, so they work on a site box
with no way out.
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

    return bp
