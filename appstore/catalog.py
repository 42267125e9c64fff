"""The catalog: published app versions and their package blobs.

A package is accepted only when it verifies against a trusted key
(:func:`cloud_sync.package.read_package`) and its manifest matches its model's
real tensors. A name+version is immutable: publishing the same bytes again is
a no-op, publishing different bytes under it is a :class:`Conflict`.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.errors import PackageError
from cloud_sync.package import read_package

from .blobstore import ContentStore
from .db import Store
from .errors import Conflict, NotFound, PackageRejected, TooLarge
from .tensors import validate_model

logger = logging.getLogger(__name__)

_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?")


def semver_key(version: str) -> tuple:
    """Sort key: 1.10.0 > 1.9.0, and 1.0.0 > 1.0.0-rc.1."""
    m = _SEMVER.match(version)
    if not m:
        return (-1, -1, -1, 0, ())
    pre = m.group(4)
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                    for p in pre.split(".")) if pre else ()
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre_key)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": r["name"], "version": r["version"], "sha256": r["sha256"], "size": r["size"],
        "task": r["task"], "key_id": r["key_id"], "published_at": r["published_at"],
        "manifest": json.loads(r["manifest"]),
    }


class Catalog:
    def __init__(
        self,
        store: Store,
        blobs: ContentStore,
        trusted_keys: Callable[[], dict[str, bytes]],
        max_bytes: int,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.trusted_keys = trusted_keys
        self.max_bytes = max_bytes

    # -- publishing ------------------------------------------------------------
    def add_package_file(self, path: str | Path) -> tuple[dict[str, Any], bool]:
        """Verify the package at ``path`` and publish it; the file is moved into
        the blob store (or deleted when already there). Returns ``(version,
        created)``; ``created`` is False when these very bytes were published."""
        path = Path(path)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise TooLarge("too_large", f"package of {size} bytes > limit {self.max_bytes}")
        try:
            pkg = read_package(path, self.trusted_keys())
        except PackageError as err:
            cls = TooLarge if err.reason == "too_large" else PackageRejected
            raise cls(err.reason, err.detail) from err
        m = pkg.manifest
        validate_model(m, pkg.model_bytes, pkg.labels)
        existing = self._find(m.name, m.version)
        if existing is not None:
            return self._same_or_conflict(existing, pkg.sha256), False
        self.blobs.put_file(path, pkg.sha256)
        row = {
            "name": m.name, "version": m.version, "sha256": pkg.sha256, "size": size,
            "task": m.task, "manifest": m.model_dump_json(), "key_id": pkg.key_id,
            "published_at": time.time(),
        }
        try:
            with self.store.write() as db:
                db["app_versions"].insert(row)
        except sqlite3.IntegrityError:  # published concurrently
            existing = self._find(m.name, m.version)
            assert existing is not None
            return self._same_or_conflict(existing, pkg.sha256), False
        logger.info("published %s %s (%s, %d bytes, key %s)", m.name, m.version,
                    pkg.sha256[:12], size, pkg.key_id)
        return _row(row), True

    @staticmethod
    def _same_or_conflict(existing: dict[str, Any], sha256: str) -> dict[str, Any]:
        if existing["sha256"] != sha256:
            raise Conflict(
                "version_exists",
                f"{existing['name']} {existing['version']} is already published with other "
                f"content (sha256 {existing['sha256']}); publish it under a new version",
            )
        return existing

    # -- queries -----------------------------------------------------------------
    def _find(self, name: str, version: str) -> dict[str, Any] | None:
        with self.store.read() as db:
            rows = list(db.query(
                "select * from app_versions where name = ? and version = ?", [name, version]))
        return _row(rows[0]) if rows else None

    def get_version(self, name: str, version: str) -> dict[str, Any]:
        found = self._find(name, version)
        if found is None:
            raise NotFound("unknown_version", f"no app {name!r} version {version!r}")
        return found

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name``, newest (semver) first."""
        with self.store.read() as db:
            rows = [_row(r) for r in db.query("select * from app_versions where name = ?", [name])]
        if not rows:
            raise NotFound("unknown_app", f"no app {name!r}")
        return sorted(rows, key=lambda r: semver_key(r["version"]), reverse=True)

    def list_apps(self) -> list[dict[str, Any]]:
        """One entry per app: its latest version, plus ``versions`` (all, newest first)."""
        by_name: dict[str, list[dict[str, Any]]] = {}
        with self.store.read() as db:
            for r in db.query("select * from app_versions order by name"):
                by_name.setdefault(r["name"], []).append(_row(r))
        out = []
        for name, rows in sorted(by_name.items()):
            rows.sort(key=lambda r: semver_key(r["version"]), reverse=True)
            latest = dict(rows[0])
            latest["versions"] = [r["version"] for r in rows]
            out.append(latest)
        return out

    def blob_path(self, sha256: str) -> Path | None:
        """The package file of ``sha256`` (what the blob server and downloads serve)."""
        return self.blobs.path(sha256)

    def count(self) -> dict[str, int]:
        with self.store.read() as db:
            r = next(db.query("select count(distinct name) as apps, count(*) as versions "
                              "from app_versions"))
        return {"apps": r["apps"], "versions": r["versions"]}
