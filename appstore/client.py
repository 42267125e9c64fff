"""A small client of the AppStore REST API (stdlib only), used by the CLI.

A JSON error answer becomes the :class:`AppStoreError` subclass of its status,
carrying the server's reason and detail; no answer at all is
:class:`ApiUnreachable`. With a ``token`` every request carries
``Authorization: Bearer <token>``; a 401 or 403 says which token was used
(where it came from, never the token itself).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .errors import (
    ApiUnreachable,
    AppStoreError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    TooLarge,
)

logger = logging.getLogger(__name__)

DEFAULT_API = "http://127.0.0.1:8080"
_BY_STATUS: dict[int, type[AppStoreError]] = {403: Forbidden, 404: NotFound, 409: Conflict,
                                              413: TooLarge}
NO_TOKEN_HINT = ("no API token: give --api-token-file FILE, set AIDC_STORE_TOKEN, or, on the "
                 "AppStore's machine, --data-dir DIR / --config FILE (DIR/admin.token)")


class ApiClient:
    def __init__(self, base_url: str = DEFAULT_API, timeout: float = 60.0,
                 token: str | None = None, token_source: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token
        #: where the token came from, for error messages ("--api-token-file x")
        self.token_source = token_source

    def _auth_hint(self) -> str:
        return (f"the token from {self.token_source or 'the caller'} was used"
                if self.token else NO_TOKEN_HINT)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", query: dict[str, Any] | None = None,
                ) -> Any:
        path = f"/api/v1{path}"
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                path += "?" + urllib.parse.urlencode(q)
        with self._call(method, path, body, content_type) as resp:
            return json.loads(resp.read() or b"null")

    def download(self, path: str, dest: str | Path) -> Path:
        """GET ``path`` (from the server root, e.g. a ``bundle_url``) into ``dest``."""
        with self._call("GET", path) as resp:
            Path(dest).write_bytes(resp.read())
        return Path(dest)

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json") -> Any:
        req = urllib.request.Request(f"{self.base}{path}", data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise self._error(err) from err
        except (urllib.error.URLError, OSError) as err:
            raise ApiUnreachable("unreachable", f"cannot reach the AppStore at {self.base}: "
                                 f"{getattr(err, 'reason', err)}") from err

    def _error(self, err: urllib.error.HTTPError) -> AppStoreError:
        raw = err.read()
        try:
            info = json.loads(raw)
            reason, detail = info.get("error", "error"), info.get("detail", "")
        except (ValueError, AttributeError):
            reason, detail = f"http_{err.code}", raw[:200].decode(errors="replace")
        if err.code in (401, 403) and reason in ("unauthenticated", "forbidden") \
                and isinstance(detail, str):
            detail = f"{detail} ({self._auth_hint()})"
        if err.code == 401:
            from .auth import Unauthenticated

            exc: AppStoreError = Unauthenticated(reason, detail)
        else:
            cls = _BY_STATUS.get(err.code, BadRequest if err.code < 500 else AppStoreError)
            exc = cls(reason, detail)
        exc.status = err.code
        return exc

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def upload(self, package: str | Path) -> dict[str, Any]:
        return self.request("POST", "/packages", Path(package).read_bytes(),
                            content_type="application/zip")

    def assign(self, node_id: str, app: str, version: str,
               resources: dict[str, Any] | None = None,
               upload: str | None = None) -> dict[str, Any]:
        req: dict[str, Any] = {"version": version}
        if resources:
            req["resources"] = resources
        if upload:
            req["upload"] = upload
        body = json.dumps(req).encode()
        return self.request("PUT", f"/nodes/{_q(node_id)}/apps/{_q(app)}", body)

    def set_training(self, node_id: str, training: dict[str, Any] | None) -> dict[str, Any]:
        """PUT the node's training windows ({"timezone", "windows"}); None clears them."""
        path = f"/nodes/{_q(node_id)}/training"
        if training is None:
            return self.request("DELETE", path)
        return self.request("PUT", path, json.dumps(training).encode())

    def unassign(self, node_id: str, app: str) -> dict[str, Any]:
        return self.request("DELETE", f"/nodes/{_q(node_id)}/apps/{_q(app)}")


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")
