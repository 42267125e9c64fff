"""The REST API under ``/api/v1`` (JSON), a Flask app factory.

Errors are turned into JSON here and only here: ``{"error": reason, "detail":
...}`` with the status of the :class:`AppStoreError` subclass; a bad request
never produces a 500.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, jsonify, request, send_file
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cloud_sync.schemas import UPLOAD_LEVELS, ResourceOverride, TrainingSchedule

from . import __version__
from .auth import actor, current_operator
from .blobstore import SHA256_RE
from .catalog import Catalog
from .config import AppStoreConfig
from .errors import AppStoreError, BadRequest, NotFound, TooLarge
from .feedback import FeedbackStore
from .fleet import Fleet
from .registry import Registry

logger = logging.getLogger(__name__)

PREFIX = "/api/v1"


@dataclass
class ApiContext:
    """What the handlers use; built by :class:`appstore.service.AppStoreService`."""

    cfg: AppStoreConfig
    catalog: Catalog
    registry: Registry
    feedback: FeedbackStore
    fleet: Fleet
    trusted_keys: Any  # () -> {key_id: raw public key}
    datasets: Any = None  # appstore.retrain.Datasets
    retrainer: Any = None  # appstore.retrain.Retrainer
    enrolment: Any = None  # appstore.enrolment.Enrolment, or None: enrolment is off
    rollouts: Any = None  # appstore.rollouts.RolloutEngine
    subscriptions: Any = None  # appstore.subscriptions.Subscriptions
    operators: Any = None  # appstore.auth.Operators


def _error(status: int, reason: str, detail: Any = "") -> Any:
    resp = jsonify({"error": reason, "detail": detail})
    resp.status_code = status
    return resp


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("bad_json", "the body must be a JSON object")
    return body


def _save_upload(ctx: ApiContext) -> str:
    """Stream the uploaded package (multipart ``file`` or raw body) to a temp file."""
    ctx.cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ctx.cfg.tmp_dir, prefix="upload-", suffix=".zip")
    try:
        with os.fdopen(fd, "wb") as out:
            if request.mimetype == "multipart/form-data":
                f = request.files.get("file")
                if f is None:
                    raise BadRequest("no_file", "multipart upload without a 'file' part")
                f.save(out)
            else:
                while chunk := request.stream.read(1 << 20):
                    out.write(chunk)
        if os.path.getsize(tmp) == 0:
            raise BadRequest("empty", "no package in the request body")
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("api", __name__, url_prefix=PREFIX)

    @bp.get("/health")
    def health() -> Any:
        return jsonify({"ok": True, "version": __version__,
                        "mqtt_connected": ctx.fleet.conn.connected.is_set()})

    @bp.get("/apps")
    def apps() -> Any:
        return jsonify({"apps": ctx.catalog.list_apps()})

    @bp.get("/apps/<name>")
    def app_versions(name: str) -> Any:
        return jsonify({"name": name, "versions": ctx.catalog.versions(name)})

    @bp.get("/apps/<name>/versions/<version>")
    def app_version(name: str, version: str) -> Any:
        return jsonify(ctx.catalog.get_version(name, version))

    @bp.get("/packages/<sha256>")
    def package(sha256: str) -> Any:
        if not SHA256_RE.match(sha256):
            raise BadRequest("bad_sha256", "a package is addressed by 64 lowercase hex digits")
        path = ctx.catalog.blob_path(sha256)
        if path is None:
            raise NotFound("unknown_package", f"no package {sha256}")
        return send_file(path, mimetype="application/zip", as_attachment=True,
                         download_name=f"{sha256}.zip", conditional=True, etag=sha256)

    @bp.post("/packages")
    def upload() -> Any:
        tmp = _save_upload(ctx)
        try:
            version, created = ctx.catalog.add_package_file(tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return jsonify({**version, "created": created}), 201 if created else 200

    @bp.get("/keys")
    def keys() -> Any:
        return jsonify({"keys": {k: v.hex() for k, v in ctx.trusted_keys().items()}})

    @bp.get("/nodes")
    def nodes() -> Any:
        return jsonify({"nodes": ctx.registry.list_nodes()})

    @bp.get("/nodes/<node_id>")
    def node(node_id: str) -> Any:
        return jsonify(ctx.registry.get_node(node_id))

    @bp.put("/nodes/<node_id>/apps/<name>")
    def assign(node_id: str, name: str) -> Any:
        body = _json_body()
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise BadRequest("bad_json", 'expected {"version": "<semver>"}')
        resources = body.get("resources")
        if resources is not None:
            try:
                resources = ResourceOverride.model_validate(resources).model_dump(
                    exclude_none=True) or None
            except ValidationError as err:
                e = err.errors()[0]
                raise BadRequest("bad_resources", f"{'.'.join(map(str, e['loc']))}: "
                                 f"{e['msg']}") from err
        upload = body.get("upload")
        if upload is not None and upload not in UPLOAD_LEVELS:
            raise BadRequest("bad_upload", f"upload {upload!r} is not one of "
                             f"{', '.join(UPLOAD_LEVELS)} (or absent: the site's own policy)")
        ds = ctx.fleet.assign(node_id, name, version, resources, upload)
        return jsonify({"desired": ds.model_dump()})

    @bp.put("/nodes/<node_id>/training")
    def set_training(node_id: str) -> Any:
        """Training windows for the node: {"timezone": "Europe/Paris", "windows": [...]}."""
        try:
            training = TrainingSchedule.model_validate(_json_body())
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(map(str, e["loc"])) or "(body)"
            raise BadRequest("bad_training", f"{where}: {e['msg']}") from err
        return jsonify({"desired": ctx.fleet.set_training(node_id, training).model_dump()})

    @bp.delete("/nodes/<node_id>/training")
    def clear_training(node_id: str) -> Any:
        """Back to the windows in the node's own config."""
        return jsonify({"desired": ctx.fleet.set_training(node_id, None).model_dump()})

    @bp.delete("/nodes/<node_id>/apps/<name>")
    def unassign(node_id: str, name: str) -> Any:
        return jsonify({"desired": ctx.fleet.unassign(node_id, name).model_dump()})

    @bp.get("/apps/<name>/dataset")
    def dataset(name: str) -> Any:
        """The app's dataset: distinct labelled inputs from the fleet, per site."""
        items, stats = ctx.datasets.items(name)
        if request.args.get("items") == "true":
            stats["items_list"] = [{k: v for k, v in i.items() if k != "path"}
                                   for i in items[:1000]]
        return jsonify(stats)

    @bp.post("/apps/<name>/retrain")
    def retrain(name: str) -> Any:
        """{"base_version": "1.0.0", "version": "1.1.0", "assign": ["site-1"], "by": "ops"}"""
        body = _json_body()
        base, version = body.get("base_version"), body.get("version")
        assign = body.get("assign") or []
        if not isinstance(base, str) or not isinstance(version, str):
            raise BadRequest("bad_retrain", "base_version and version are required strings")
        if not isinstance(assign, list) or not all(isinstance(n, str) for n in assign):
            raise BadRequest("bad_retrain", "assign is a list of node ids")
        config = body.get("config") or {}
        allowed = {"l2", "replay_weight", "class_weight", "max_iter", "patience", "seed"}
        if not isinstance(config, dict) or set(config) - allowed:
            raise BadRequest("bad_retrain", f"config keys are {sorted(allowed)}")
        out = ctx.retrainer.request(name, base, version, assign, actor(), config)
        return jsonify(out), 202

    @bp.get("/retrains")
    def retrains() -> Any:
        return jsonify({"retrains": ctx.retrainer.list(request.args.get("app"))})

    @bp.get("/retrains/<rid>")
    def retrain_get(rid: str) -> Any:
        return jsonify(ctx.retrainer.get(rid))

    @bp.put("/nodes/<node_id>/labels")
    def node_labels(node_id: str) -> Any:
        body = _json_body()
        return jsonify(ctx.registry.set_labels(node_id, body.get("site"), body.get("group"),
                                               body.get("tags")))

    @bp.get("/apps/<name>/channels")
    def channels(name: str) -> Any:
        return jsonify({"app": name, "channels": ctx.subscriptions.channels(name)})

    @bp.put("/apps/<name>/channels/<channel>")
    def set_channel(name: str, channel: str) -> Any:
        body = _json_body()
        return jsonify(ctx.subscriptions.set_channel(name, channel, body.get("version"),
                                                     actor()))

    @bp.post("/subscriptions")
    def subscribe() -> Any:
        return jsonify(ctx.subscriptions.create({**_json_body(), "by": actor()})), 201

    @bp.get("/subscriptions")
    def subscriptions() -> Any:
        return jsonify({"subscriptions": ctx.subscriptions.list(request.args.get("app"))})

    @bp.delete("/subscriptions/<int:sid>")
    def unsubscribe(sid: int) -> Any:
        return jsonify(ctx.subscriptions.delete(sid))

    @bp.post("/rollouts")
    def rollout_create() -> Any:
        return jsonify(ctx.rollouts.create({**_json_body(), "by": actor()})), 201

    @bp.get("/rollouts")
    def rollout_list() -> Any:
        return jsonify({"rollouts": ctx.rollouts.list(request.args.get("app"))})

    @bp.get("/rollouts/<rid>")
    def rollout_get(rid: str) -> Any:
        return jsonify(ctx.rollouts.get(rid, nodes=request.args.get("nodes") != "0"))

    @bp.post("/rollouts/<rid>/<action>")
    def rollout_action(rid: str, action: str) -> Any:
        body = _json_body() if request.data else {}
        by = actor()
        if action == "pause":
            return jsonify(ctx.rollouts.pause(rid, by))
        if action == "resume":
            return jsonify(ctx.rollouts.resume(rid, by))
        if action == "abort":
            return jsonify(ctx.rollouts.abort(rid, by, bool(body.get("rollback"))))
        if action == "rollback":
            return jsonify(ctx.rollouts.rollback(rid, by))
        raise NotFound("unknown_action", f"{action!r}: use pause, resume, abort or rollback")

    @bp.get("/telemetry")
    def telemetry() -> Any:
        """The latest learning figures per node and app (?app=&node=)."""
        a = request.args
        return jsonify({"telemetry": ctx.feedback.telemetry(a.get("app"), a.get("node"))})

    @bp.get("/apps/<name>/accuracy")
    def accuracy(name: str) -> Any:
        """Field accuracy over time: a point per node each time its figures changed."""
        try:
            limit = int(request.args.get("limit", "1000"))
        except ValueError as err:
            raise BadRequest("bad_limit", "limit must be an integer") from err
        return jsonify({"app": name, "points": ctx.feedback.accuracy_series(
            name, request.args.get("node"), limit)})

    @bp.get("/feedback")
    def feedback() -> Any:
        a = request.args
        try:
            limit = int(a.get("limit", "100"))
        except ValueError as err:
            raise BadRequest("bad_limit", "limit must be an integer") from err
        rows = ctx.feedback.query(app=a.get("app"), node=a.get("node"),
                                  version=a.get("version"), limit=limit)
        for r in rows:
            r["input_url"] = f"{PREFIX}/feedback/{r['msg_id']}/input"
            if r.get("features_sha256"):
                r["features_url"] = f"{PREFIX}/feedback/{r['msg_id']}/features"
        return jsonify({"feedback": rows})

    @bp.get("/events")
    def events() -> Any:
        a = request.args
        try:
            limit = int(a.get("limit", "100"))
        except ValueError as err:
            raise BadRequest("bad_limit", "limit must be an integer") from err
        return jsonify({"events": ctx.feedback.events(node=a.get("node"), app=a.get("app"),
                                                       type=a.get("type"), limit=limit)})

    @bp.get("/feedback/<msg_id>/input")
    def feedback_input(msg_id: str) -> Any:
        path, ctype = ctx.feedback.input_file(msg_id)
        return send_file(path, mimetype=ctype, conditional=True)

    @bp.get("/feedback/<msg_id>/features")
    def feedback_features(msg_id: str) -> Any:
        """A features-only sample's vector: {"tensor", "n", "model_sha256", "values"}."""
        return jsonify(ctx.feedback.features(msg_id))

    def enrolment() -> Any:
        if ctx.enrolment is None:
            raise NotFound("enrolment_off", "enrolment is off in this AppStore "
                           "(the 'enrolment' section of its config)")
        return ctx.enrolment

    @bp.post("/enrolment/tokens")
    def token_create() -> Any:
        """Admin: {"ttl_s": 3600, "note": "..."}; the token is shown once."""
        body = request.get_json(silent=True) or {}
        if not isinstance(body, dict):
            raise BadRequest("bad_json", "the body must be a JSON object")
        return jsonify(enrolment().create_token(body.get("ttl_s"), actor(),
                                                body.get("note"))), 201

    @bp.get("/enrolment/tokens")
    def token_list() -> Any:
        return jsonify({"tokens": enrolment().tokens()})

    @bp.get("/enrolment/nodes")
    def enrolled_nodes() -> Any:
        return jsonify({"nodes": enrolment().nodes()})

    @bp.post("/enrol")
    def enrol() -> Any:
        """Node: {"token", "node_id", "site"?, "group"?} -> its identity and broker
        credentials (shown once)."""
        body = _json_body()
        return jsonify(enrolment().enrol(body.get("token"), body.get("node_id"),
                                         body.get("site"), body.get("group"),
                                         remote=request.remote_addr)), 201

    @bp.post("/nodes/<node_id>/revoke")
    def revoke(node_id: str) -> Any:
        return jsonify(enrolment().revoke(node_id, actor()))

    @bp.get("/whoami")
    def whoami() -> Any:
        """The operator this request authenticated as (its role decides the rest)."""
        op = current_operator()
        if op is None:  # api_auth = "off"
            return jsonify({"name": None, "role": "admin", "auth": "off"})
        return jsonify({**ctx.operators.get(op["name"]), "auth": "token"})

    @bp.get("/operators")
    def operators() -> Any:
        return jsonify({"operators": ctx.operators.list()})

    @bp.post("/operators")
    def operator_create() -> Any:
        """Admin: {"name": "ops-1", "role": "operator", "expires_in_s": 2592000}; the
        token is in the answer, once."""
        body = _json_body()
        row, token = ctx.operators.add(body.get("name"), body.get("role"), actor(),
                                       body.get("expires_in_s"))
        return jsonify({**row, "token": token}), 201

    @bp.post("/operators/<name>/revoke")
    def operator_revoke(name: str) -> Any:
        return jsonify(ctx.operators.revoke(name, actor()))

    @bp.get("/stats")
    def stats() -> Any:
        if ctx.operators is not None:
            ctx.operators.flush()  # refused requests counted since the last write
        return jsonify({
            "ingest": ctx.fleet.snapshot(),
            "rejections": ctx.feedback.rejections(),
            "counts": {**ctx.catalog.count(), **ctx.registry.counts(), **ctx.feedback.counts()},
            "mqtt": dict(ctx.fleet.conn.stats),
        })

    return bp


def create_app(ctx: ApiContext) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = ctx.cfg.max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(_blueprint(ctx))

    @app.errorhandler(AppStoreError)
    def on_appstore_error(err: AppStoreError) -> Any:
        if err.status >= 500:
            logger.warning("%s %s: %s", request.method, request.path, err)
        return _error(err.status, err.reason, err.detail)

    @app.errorhandler(RequestEntityTooLarge)
    def on_too_large(err: RequestEntityTooLarge) -> Any:
        return _error(TooLarge.status, "too_large",
                      f"request body over the limit of {ctx.cfg.max_upload_mb} MB")

    @app.errorhandler(HTTPException)
    def on_http(err: HTTPException) -> Any:
        reason = (err.name or "error").lower().replace(" ", "_")
        return _error(err.code or 400, reason, err.description)

    @app.errorhandler(Exception)
    def on_bug(err: Exception) -> Any:
        logger.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal", "internal error; see the AppStore log")

    return app
