"""Wires one AppStore: database, key, MQTT, fleet, blob server, REST API.

Nothing else lives here: components get explicit constructor arguments, start
in order and stop in reverse. Used by ``aidc store serve``, the all-in-one demo
and the tests.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per request (counters live in /stats); Nagle off."""

    disable_nagle_algorithm = True

    def log_request(self, code="-", size="-") -> None:  # noqa: D102
        pass

from cloud_sync.connection import MqttConnection
from cloud_sync.schemas import Availability
from cloud_sync.topics import Topics

from . import broker_hooks, broker_tls
from .api import ApiContext, create_app
from .auth import Operators, install as install_auth, is_loopback
from .blobstore import ContentStore
from .catalog import Catalog
from .commands import Commands, make_blueprint as commands_blueprint
from .config import AppStoreConfig
from .db import Store
from .errors import ConfigError
from .enrolment import Enrolment
from .feedback import FeedbackStore
from .fleet import Fleet
from .registry import Registry
from .retrain import Datasets, Retrainer
from .rollouts import RolloutEngine
from .subscriptions import Subscriptions
from .signing import SigningKey, trusted_keys

logger = logging.getLogger(__name__)


def _blob_server(conn: MqttConnection, topics: Topics, lookup: Callable[[str], Any],
                 shared_group: str | None) -> Any:
    """The MQTT blob server of :mod:`cloud_sync.blobs`, or None where absent."""
    try:
        from cloud_sync.blobs import BlobServer
    except ImportError as err:
        logger.warning("no MQTT blob server (%s): nodes must download packages over HTTP", err)
        return None
    return BlobServer(conn, topics, lookup=lookup, shared_group=shared_group)


class AppStoreService:
    """One AppStore instance; ``start()`` then ``stop()``."""

    def __init__(self, cfg: AppStoreConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(prefix=cfg.topic_prefix)
        self.store: Store | None = None
        self.key: SigningKey | None = None
        self.conn: MqttConnection | None = None
        self.fleet: Fleet | None = None
        self.catalog: Catalog | None = None
        self.registry: Registry | None = None
        self.feedback: FeedbackStore | None = None
        self.blob_server: Any = None
        self.enrolment: Enrolment | None = None
        self.rollouts: RolloutEngine | None = None
        self.app: Any = None
        self.operators: Operators | None = None
        #: the bootstrap admin's token when this start made it (also in
        #: ``cfg.admin_token_path``); see :attr:`admin_token`
        self.bootstrap_token: str | None = None
        self._http: BaseWSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def trusted_keys(self) -> dict[str, bytes]:
        """Our key plus ``keys/trusted/*.pub``, read afresh (add a key, no restart)."""
        return trusted_keys(self.key, self.cfg.trusted_dir)

    def start(self) -> "AppStoreService":
        """Start everything in order; on a failure, stop what was started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.api_auth == "off" and not is_loopback(cfg.http_host):  # a copied config
            raise ConfigError("bad_config", f"api_auth = 'off' with http_host = "
                              f"{cfg.http_host!r}: the REST API would be open to the network")
        self.store = Store(cfg.db_path)
        self.operators = Operators(self.store)
        if cfg.api_auth == "token":
            self.bootstrap_token = self.operators.bootstrap(cfg.data_dir)
        else:
            logger.warning("api_auth = 'off': the REST API checks no token (loopback only)")
        self.key = SigningKey.load_or_create(cfg.signing_key_path)
        blobs = ContentStore(cfg.blobs_dir)
        self.catalog = Catalog(self.store, blobs, self.trusted_keys, cfg.max_upload_bytes)
        self.registry = Registry(self.store)
        self.feedback = FeedbackStore(self.store, ContentStore(cfg.samples_dir))
        if cfg.enrolment is not None:  # the broker must know our own user first
            self.enrolment = Enrolment(cfg, self.store, on_revoked=self._revoked)
            self.enrolment.sync()
        client_id = f"appstore-{secrets.token_hex(4)}"
        self.conn = MqttConnection(
            client_id, cfg.mqtt_host, cfg.mqtt_port,
            username=cfg.mqtt_username, password=cfg.mqtt_password,
            tls=broker_tls.client_tls(cfg), ping_topic=self.topics.service_ping(client_id),
        )
        self.fleet = Fleet(self.conn, self.topics, self.store, self.registry, self.catalog,
                           self.feedback, shared_group=cfg.shared_group,
                           queue_size=cfg.ingest_queue)
        self.fleet.start()
        self.subscriptions = Subscriptions(self.store, self.catalog,
                                           assign=self.fleet.set_version)
        self.rollouts = RolloutEngine(
            self.store, self.catalog, self.registry, assign=self.fleet.set_version,
            unassign=lambda node, app: self.fleet.unassign(node, app),
            periodic=[(2.0, self.subscriptions.reconcile)],
            assign_many=self.fleet.set_versions)
        self.fleet.on_reported = self.rollouts.nudge
        self.rollouts.start()
        self.blob_server = _blob_server(self.conn, self.topics, self.catalog.blob_path,
                                        cfg.shared_group)
        if self.blob_server is not None:
            self.blob_server.start()
        self.commands = Commands(self.store, self.registry, self.conn, self.topics,
                                 ContentStore(cfg.data_dir / "bundles"), cfg.shared_group)
        self.commands.start()  # subscribes to the results: before the connect
        self.conn.start()
        self.datasets = Datasets(self.store, self.feedback.samples)
        self.retrainer = Retrainer(cfg, self.store, self.catalog, self.datasets, self.key,
                                   self.fleet)
        self.app = create_app(ApiContext(cfg, self.catalog, self.registry, self.feedback,
                                         self.fleet, self.trusted_keys, self.datasets,
                                         self.retrainer, self.enrolment, self.rollouts,
                                         self.subscriptions, self.operators))
        self.app.register_blueprint(commands_blueprint(self.commands))
        self.broker_auth = broker_hooks.register(self.app, cfg, self.store)
        install_auth(self.app, self.operators, cfg.api_auth)
        self._http = make_server(cfg.http_host, cfg.http_port, self.app, threaded=True,
                                 request_handler=_QuietHandler)
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="appstore-http", daemon=True)
        self._http_thread.start()
        logger.info("AppStore up: %s (mqtt %s:%s, prefix %r, key %s)", self.url,
                    cfg.mqtt_host, cfg.mqtt_port, cfg.topic_prefix, self.key.key_id)

    def _revoked(self, node_id: str) -> None:
        """A revoked node's last will is dropped by the broker (its ACL is gone):
        say it is offline in its place, retained, so every worker and a restarted
        AppStore agree."""
        if self.conn is not None:
            self.conn.publish(self.topics.availability(node_id),
                              Availability(status="offline").to_bytes(), qos=1, retain=True)

    @property
    def admin_token(self) -> str | None:
        """An admin token for in-process callers (the demo, benches, tests): the one
        this start made, else the one in ``data_dir/admin.token``, if any."""
        if self.bootstrap_token:
            return self.bootstrap_token
        try:
            return self.cfg.admin_token_path.read_text().strip() or None
        except OSError:
            return None

    @property
    def url(self) -> str:
        """Base URL of the REST API (``http://host:port``; add ``/api/v1/...``)."""
        if self._http is None:
            raise RuntimeError("the AppStore is not started")
        return f"http://{self.cfg.http_host}:{self._http.server_port}"

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return bool(self.conn and self.conn.wait_connected(timeout))

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
        if getattr(self, "commands", None) is not None:
            self.commands.stop()
        if self.conn is not None:
            self.conn.stop()
        if self.blob_server is not None:
            self.blob_server.stop()
        if getattr(self, "retrainer", None) is not None:
            self.retrainer.join()
        if self.rollouts is not None:
            self.rollouts.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.operators is not None:
            self.operators.close()
        if self.store is not None:
            self.store.close()
        self.conn = self.blob_server = self.fleet = self.store = None
        logger.info("AppStore stopped")

    def __enter__(self) -> "AppStoreService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
