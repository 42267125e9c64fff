"""A small client of the AppStore REST API (stdlib only), used by the CLI.

A JSON error answer becomes the :class:`AppStoreError` subclass of its status,
carrying the server's reason and detail; no answer at all is
:class:`ApiUnreachable`.
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
    NotFound,
    TooLarge,
)

logger = logging.getLogger(__name__)

DEFAULT_API = "http://127.0.0.1:8080"
_BY_STATUS: dict[int, type[AppStoreError]] = {404: NotFound, 409: Conflict, 413: TooLarge}


class ApiClient:
    def __init__(self, base_url: str = DEFAULT_API, timeout: float = 60.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", query: dict[str, Any] | None = None,
                ) -> Any:
        url = f"{self.base}/api/v1{path}"
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                info = json.loads(raw)
                reason, detail = info.get("error", "error"), info.get("detail", "")
            except (ValueError, AttributeError):
                reason, detail = f"http_{err.code}", raw[:200].decode(errors="replace")
            cls = _BY_STATUS.get(err.code, BadRequest if err.code < 500 else AppStoreError)
            exc = cls(reason, detail)
            exc.status = err.code
            raise exc from err
        except (urllib.error.URLError, OSError) as err:
            raise ApiUnreachable("unreachable", f"cannot reach the AppStore at {self.base}: "
                                 f"{getattr(err, 'reason', err)}") from err

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
