"""A served app's unpacked files no longer what was signed: fault ``model_corrupt``.

The reference is the package's own signed list of member hashes
(``signature.json`` in the package, kept in the local blob cache under its
sha256): read once per version, its Ed25519 signature checked against the
node's trusted keys. Each probe then looks at every served app's unpacked
files (the model, the manifest, the labels):

- cheaply on every probe: the file is there, has the signed size, and its
  (size, mtime, inode) is the one last hashed -- a truncated, replaced or
  rewritten file is caught at once without reading it;
- in full every ``full_every_s``: the sha256 of each file (bit rot, a write
  that kept size and mtime).

The remedy, per damaged app: verify its cached package again (sha256 of the
zip and the signature, :func:`~cloud_sync.package.read_package`); if it holds,
the app dir is marked incomplete and the reconciler unpacks it afresh from the
package and starts a new worker in place of the running one
(:meth:`~edge_node.reconciler.Reconciler.reinstall`); if the cached package is
bad too, it is deleted and the same reinstall fetches it again from the cloud.
The remedy waits (up to ``heal_wait_s``) for that pass, so the episode's time
runs until the app serves from good files again.

A site variant (a model fine-tuned on this node) has no package signature; its
files are not checked here. An app served by another version than the desired
one (a crash loop rolled it back to its last known good) is checked, but not
healed automatically: the finding stays open and says so.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.errors import PackageError
from cloud_sync.package import read_package, sha256_file, signed_members

from .base import Check, Finding, HealError

logger = logging.getLogger(__name__)


class ModelIntegrityCheck(Check):
    name = "model_integrity"

    def __init__(self, reconciler: Any, *, interval_s: float = 10.0,
                 full_every_s: float = 600.0, heal_wait_s: float = 60.0,
                 trusted_keys: Callable[[], dict[str, bytes]] | None = None,
                 blobs_dir: Path | None = None, apps_dir: Path | None = None) -> None:
        self.reconciler = reconciler
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self.heal_wait_s = heal_wait_s
        self.trusted_keys = trusted_keys or reconciler.trusted_keys
        self.blobs_dir = Path(blobs_dir or reconciler.blobs_dir)
        self.apps_dir = Path(apps_dir or reconciler.apps_dir)
        self._signed: dict[str, dict[str, tuple[str, int]]] = {}  # package sha256 -> members
        self._hashed: dict[Path, tuple[int, int, int]] = {}  # file -> (size, mtime_ns, ino)
        self._last_full: float | None = None  # the first probe hashes every file
        self.stats = {"files_hashed": 0, "full_passes": 0}

    def _served(self) -> list[tuple[str, str]]:
        """(app name, package sha256) of every app served from its package."""
        out = []
        for report in self.reconciler.reports():
            s = self.reconciler.serving(report.name)
            if s is not None and not s.get("variant"):
                out.append((report.name, s["sha256"]))
        return out

    def _members(self, sha: str) -> dict[str, tuple[str, int]]:
        members = self._signed.get(sha)
        if members is None:
            members = signed_members(self.blobs_dir / sha, self.trusted_keys())
            self._signed[sha] = members
        return members

    def _problems(self, app_dir: Path, members: dict[str, tuple[str, int]],
                  full: bool) -> list[str]:
        if not (app_dir / ".complete").exists():
            return [f"{app_dir} is not completely unpacked"]
        out = []
        for name, (digest, size) in sorted(members.items()):
            path = app_dir / name
            try:
                st = path.stat()
            except OSError:
                out.append(f"{name} is missing")
                continue
            if st.st_size != size:
                out.append(f"{name} is {st.st_size} bytes, signed {size}")
                self._hashed.pop(path, None)
                continue
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
            if not full and self._hashed.get(path) == stamp:
                continue
            self.stats["files_hashed"] += 1
            if sha256_file(path) != digest:
                out.append(f"{name} does not match its signed sha256")
                self._hashed.pop(path, None)
            else:
                self._hashed[path] = stamp
        return out

    def probe(self) -> Finding:
        now = time.monotonic()
        full = self._last_full is None or now - self._last_full >= self.full_every_s
        bad, checked, unverifiable = {}, [], {}
        for name, sha in self._served():
            app_dir = self.apps_dir / name / sha[:16]
            try:
                members = self._members(sha)
            except PackageError as err:
                # the reference itself is gone or damaged: the files may be fine, but a
                # restart could not be trusted; the remedy fetches the package again
                problems = [f"cached package unusable ({err.reason}: {err.detail})"]
                unverifiable[name] = err.reason
            else:
                problems = self._problems(app_dir, members, full)
            checked.append(name)
            if problems:
                bad[name] = {"sha256": sha, "app_dir": str(app_dir), "problems": problems}
        if full:
            self._last_full = now
            self.stats["full_passes"] += 1
        if bad:
            what = "; ".join(f"{n}: {', '.join(i['problems'])}" for n, i in bad.items())
            return Finding(self.name, False, f"damaged apps: {what}", fault="model_corrupt",
                           data={"apps": bad, "full": full})
        how = "sha256 of every file" if full else "size and mtime"
        return Finding(self.name, True, f"{len(checked)} apps intact ({how})",
                       data={"apps": checked, "full": full})

    def heal(self, finding: Finding) -> str:
        waits, done, skipped = {}, [], []
        desired = {r.name: r.sha256 for r in self.reconciler.reports()}
        for name, info in (finding.data.get("apps") or {}).items():
            sha = info["sha256"]
            if desired.get(name) != sha:
                # another version serves than the one desired (a crash loop rolled it
                # back): reinstalling would act on the desired one, not this
                skipped.append(f"{name}: serves {sha[:12]}, not the desired version")
                continue
            package = self.blobs_dir / sha
            try:
                read_package(package, self.trusted_keys(), expected_sha256=sha)
                how = "unpacked again from the cached package"
            except PackageError as err:
                package.unlink(missing_ok=True)
                how = f"cached package bad too ({err.reason}): deleted, fetched again"
            self._signed.pop(sha, None)
            (Path(info["app_dir"]) / ".complete").unlink(missing_ok=True)
            for p in list(self._hashed):
                if str(p).startswith(info["app_dir"] + os.sep):
                    del self._hashed[p]
            waits[name] = self.reconciler.reinstall(name)
            done.append(f"{name}: {how}")
            logger.warning("model integrity: %s %s", name, how)
        if not waits:
            raise HealError("; ".join(skipped) or "no damaged app named")
        deadline = time.monotonic() + self.heal_wait_s
        late = [n for n, ev in waits.items()
                if not ev.wait(max(0.0, deadline - time.monotonic()))]
        states = {r.name: r.status for r in self.reconciler.reports()}
        out = "; ".join(done) + "; worker restarted"
        if skipped:
            out += "; not healed: " + "; ".join(skipped)
        not_ready = [n for n in waits if n not in late and states.get(n) != "ready"]
        if late:
            out += f"; still installing after {self.heal_wait_s:g}s: {', '.join(late)}"
        if not_ready:
            out += "; failed: " + ", ".join(f"{n} ({states.get(n)})" for n in not_ready)
        return out

