"""disk_space: the data dir's free space, and eviction by policy before the disk is full.

Below the low-water mark the remedy frees space, tier by tier, oldest first, until
free space is back above the high-water mark:

1. samples already uploaded and answered by the cloud (their outbox message is no
   longer pending: acknowledged, or rejected, or pruned after either), unlabelled
   before labelled, oldest first -- the cloud holds them;
2. cached package blobs not among the running version and the two newest others
   of each app (the newest three when none runs) (and orphan blobs or stale ``.part`` files no fetch touched for
   :data:`STALE_S`);
3. rotated logs (``logs/*.log.*``) and diagnostics bundles (``diagnostics/*``).

A sample not yet uploaded is never evicted unless free space is below the critical
mark; then the oldest unlabelled ones go, each counted and reported (``data`` of
the finding and of the event: ``unsent_evicted``).

Everything is real: files unlinked, rows deleted from node.db. Free space is read
through ``free_probe(path) -> (total_bytes, free_bytes)`` (default
:func:`shutil.disk_usage`) -- the seam tests use to give the data dir a small quota.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

from .base import Check, Finding, HealError

MB = 1024 * 1024
#: a blob or .part file younger than this may be a fetch or an install in progress
STALE_S = 600.0
OUTBOX_TABLE = "cloud_sync_outbox"
#: versions of each app whose packages stay cached: the running one and two others
KEEP_VERSIONS = 3


def _disk_usage(path: Path) -> tuple[int, int]:
    du = shutil.disk_usage(path)
    return du.total, du.free


class DiskSpaceCheck(Check):
    name = "disk_space"
    interval_s = 10.0

    def __init__(self, data_dir: Path, *, db_path: Path | None = None,
                 free_probe: Callable[[Path], tuple[int, int]] = _disk_usage,
                 low_mb: float = 256, low_fraction: float = 0.02,
                 high_mb: float = 512, high_fraction: float = 0.05,
                 critical_mb: float = 64, critical_fraction: float = 0.005,
                 running: Callable[[], set[str]] | None = None,
                 interval_s: float | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = Path(db_path) if db_path else self.data_dir / "node.db"
        self.free_probe = free_probe
        if not (critical_mb <= low_mb <= high_mb) or not (
                critical_fraction <= low_fraction <= high_fraction):
            raise ValueError("disk_space: needs critical <= low <= high water marks, got "
                             f"{critical_mb}/{low_mb}/{high_mb} MB, "
                             f"{critical_fraction}/{low_fraction}/{high_fraction}")
        self.low = (low_mb, low_fraction)
        self.high = (high_mb, high_fraction)
        self.critical = (critical_mb, critical_fraction)
        self.running = running or (lambda: set())
        if interval_s is not None:
            self.interval_s = interval_s
        self.totals = {"evictions": 0, "samples_evicted": 0, "unsent_evicted": 0,
                       "blobs_evicted": 0, "files_evicted": 0, "bytes_freed": 0}

    # -- the marks -----------------------------------------------------------
    @staticmethod
    def _mark(total: int, mark: tuple[float, float]) -> int:
        return int(max(mark[0] * MB, mark[1] * total))

    def _read(self) -> tuple[int, int]:
        where = self.data_dir  # not created yet: the disk it will be on
        while not where.exists() and where.parent != where:
            where = where.parent
        total, free = self.free_probe(where)
        return int(total), int(free)

    def probe(self) -> Finding:
        try:
            total, free = self._read()
        except OSError as err:
            return Finding(self.name, False, f"cannot read the free space of {self.data_dir}: "
                           f"{err}", fault="disk_unreadable")
        low, high, crit = (self._mark(total, m) for m in (self.low, self.high, self.critical))
        data = {"path": str(self.data_dir), "free_mb": round(free / MB, 1),
                "total_mb": round(total / MB, 1), "low_mb": round(low / MB, 1),
                "high_mb": round(high / MB, 1), "critical_mb": round(crit / MB, 1)}
        if free >= low:
            return Finding(self.name, True, f"{free / MB:.0f} MB free of {total / MB:.0f} MB "
                           f"in {self.data_dir}", data=data)
        critical = free < crit
        return Finding(self.name, False,
                       f"{free / MB:.0f} MB free of {total / MB:.0f} MB in {self.data_dir}, "
                       f"below the {'critical' if critical else 'low-water'} mark "
                       f"({(crit if critical else low) / MB:.0f} MB)",
                       fault="disk_critical" if critical else "disk_low",
                       data={**data, "critical": critical})

    # -- the remedy ------------------------------------------------------------
    def heal(self, finding: Finding) -> str:
        if finding.fault == "disk_unreadable":
            raise HealError("the free space cannot be read; nothing is evicted blind")
        total, free = self._read()
        high, crit = self._mark(total, self.high), self._mark(total, self.critical)
        critical = free < crit
        done: dict[str, list] = {"uploaded samples": [0, 0], "package blobs": [0, 0],
                                 "logs and bundles": [0, 0], "unsent samples": [0, 0]}

        def enough() -> bool:
            return self._read()[1] >= high

        tiers: list[tuple[str, Callable[[], list[tuple[int, Callable[[], None]]]]]] = [
            ("uploaded samples", lambda: self._samples(uploaded=True)),
            ("package blobs", self._blobs),
            ("logs and bundles", self._logs),
        ]
        if critical:
            tiers.append(("unsent samples", lambda: self._samples(uploaded=False)))
        db = self._connect()
        try:
            self._db = db
            for tier, victims in tiers:
                while not enough():
                    batch = victims()
                    if not batch:
                        break
                    for nbytes, evict in batch:
                        evict()
                        done[tier][0] += 1
                        done[tier][1] += nbytes
                        if enough():
                            break
                if enough():
                    break
        finally:
            self._db = None
            if db is not None:
                db.close()
        self.totals["evictions"] += 1
        self.totals["samples_evicted"] += done["uploaded samples"][0] + done["unsent samples"][0]
        self.totals["unsent_evicted"] += done["unsent samples"][0]
        self.totals["blobs_evicted"] += done["package blobs"][0]
        self.totals["files_evicted"] += done["logs and bundles"][0]
        self.totals["bytes_freed"] += sum(b for _, b in done.values())
        finding.data.update({"evicted": {k: {"count": n, "bytes": b}
                                         for k, (n, b) in done.items() if n},
                             "unsent_evicted": done["unsent samples"][0]})
        what = ", ".join(f"{n} {k} ({b / MB:.1f} MB)" for k, (n, b) in done.items() if n)
        total, free = self._read()
        if free < self._mark(total, self.low):
            raise HealError(f"still {free / MB:.0f} MB free after evicting "
                            f"{what or 'nothing'}: nothing else may go "
                            f"{'' if critical else '(unsent samples only below the critical mark)'}"
                            .strip())
        short = "" if free >= high else f" (short of the high-water mark, {high / MB:.0f} MB)"
        return f"evicted {what or 'nothing'}; {free / MB:.0f} MB free{short}"

    _db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if not self.db_path.exists():
            return None
        conn = sqlite3.connect(str(self.db_path), timeout=30, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _has(self, table: str) -> bool:
        return self._db is not None and self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            [table]).fetchone() is not None

    def _samples(self, uploaded: bool) -> list[tuple[int, Callable[[], None]]]:
        """The next batch of samples to evict: uploaded ones (unlabelled first, oldest
        first), or unsent unlabelled ones, oldest first."""
        if not self._has("samples"):
            return []
        pending = (f"EXISTS (SELECT 1 FROM {OUTBOX_TABLE} o WHERE o.msg_id = s.msg_id "
                   "AND o.state = 'pending')" if self._has(OUTBOX_TABLE) else "0")
        if uploaded:
            where = (f"s.queued IS NOT NULL AND s.shared IN ('full', 'metadata', 'features') "
                     f"AND NOT {pending}")
            order = "(s.label IS NOT NULL), s.created_at"
        else:
            where = (f"s.label IS NULL AND NOT (s.queued IS NOT NULL AND s.shared IN "
                     f"('full', 'metadata', 'features') AND NOT {pending})")
            order = "s.created_at"
        rows = self._db.execute(
            f"SELECT s.sample_id, s.input_path, coalesce(s.nbytes, 0) FROM samples s "
            f"WHERE {where} ORDER BY {order} LIMIT 50").fetchall()
        return [(n, self._sample_evictor(sid, path)) for sid, path, n in rows]

    def _sample_evictor(self, sample_id: str, path: str | None) -> Callable[[], None]:
        def evict() -> None:
            if path:
                Path(path).unlink(missing_ok=True)
            with self._db:
                self._db.execute("DELETE FROM samples WHERE sample_id = ?", [sample_id])
        return evict

    def _blobs(self) -> list[tuple[int, Callable[[], None]]]:
        blobs = self.data_dir / "blobs"
        if not blobs.is_dir():
            return []
        keep: set[str] = set(self.running())
        if self._has("installed"):
            by_app: dict[str, list[tuple[float, str]]] = {}
            for name, sha, at in self._db.execute(
                    "SELECT name, sha256, installed_at FROM installed"):
                by_app.setdefault(name, []).append((at or 0.0, sha))
            for rows in by_app.values():
                rows.sort(reverse=True)
                newest = [sha for _, sha in rows]
                others = [s for s in newest if s not in keep]
                # the running one and the two newest others; none running: the newest three
                n = KEEP_VERSIONS - (1 if len(others) < len(newest) else 0)
                keep.update(others[:n])
        now = time.time()
        out = []
        for p in sorted(blobs.iterdir(), key=lambda p: _mtime(p)):
            if not p.is_file():
                continue
            sha = p.name.removesuffix(".part")
            if sha in keep and not p.name.endswith(".part"):
                continue
            if now - _mtime(p) < STALE_S and (p.name.endswith(".part") or not self._installed(sha)):
                continue  # a fetch or install in progress
            out.append((_size(p), _unlinker(p)))
        return out[:50]

    def _installed(self, sha: str) -> bool:
        return self._has("installed") and self._db.execute(
            "SELECT 1 FROM installed WHERE sha256 = ?", [sha]).fetchone() is not None

    def _logs(self) -> list[tuple[int, Callable[[], None]]]:
        files = []
        logs = self.data_dir / "logs"
        if logs.is_dir():
            files += [p for p in logs.iterdir() if p.is_file() and ".log." in p.name]
        diag = self.data_dir / "diagnostics"
        if diag.is_dir():
            files += [p for p in diag.iterdir() if p.is_file()]
        files.sort(key=_mtime)
        return [(_size(p), _unlinker(p)) for p in files[:50]]


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _unlinker(p: Path) -> Callable[[], None]:
    return lambda: p.unlink(missing_ok=True)
