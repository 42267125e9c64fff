"""db_integrity: ``PRAGMA quick_check`` on node.db, a last good copy, and restore.

- **The last good copy** (``node.db.last-good``, with ``node.db.last-good.json``:
  when, and rows per table) is made with SQLite's backup API, only right after a
  quick_check passed: by the monitor after an ok probe when the copy is older than
  ``backup_interval_s`` (10 min) or missing, and by the agent at a clean stop.
  It is written to a temporary file, fsynced and renamed, so a power cut leaves
  the previous copy whole.
- **Corruption while the agent runs**: the remedy keeps the damaged file for the
  technician (``node.db.corrupt-<ts>``) and restores the copy *into the live
  database* through the backup API -- a write transaction like any other, so the
  agent's own connections (store, outbox, jobs) go on with the restored content.
  Before that, every row the damaged file can still give is merged into the copy
  (:mod:`.db_salvage`: rows newer than the copy come back, by each table's key;
  only rows on unreadable pages are lost, and counted), and sample files left
  with no row are imported again; the restore then installs copy + salvage in
  one step. Rows salvaged, lost and re-imported per table are journalled.
- **Corruption found at start** (the file cannot be opened, or quick_check fails;
  e.g. page 1 destroyed, so no connection can write into it): :func:`guard_at_start`
  moves the damaged file aside and puts the copy, plus what the damaged file still
  gives, in its place before anything opens it (no copy: what can be salvaged
  into an empty database, else an empty database rather than no start at all).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import db_salvage
from .base import Check, Finding, HealError

logger = logging.getLogger(__name__)

BACKUP_INTERVAL_S = 600.0


def copy_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".last-good")


def meta_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".last-good.json")


def quick_check(db_path: Path, timeout: float = 10.0) -> tuple[bool, list[str]]:
    """(ok, SQLite's messages); a file that cannot be opened as a database is not ok."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=timeout)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as err:
        return False, [str(err)]
    return rows == ["ok"], rows


def table_counts(db_path: Path) -> dict[str, int | None]:
    """Rows per table (None where the table cannot be read); {} when nothing can."""
    out: dict[str, int | None] = {}
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return out
    try:
        try:
            names = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        except sqlite3.Error:
            return out
        for n in names:
            try:
                out[n] = conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]
            except sqlite3.Error:
                out[n] = None
    finally:
        conn.close()
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_last_good(db_path: Path) -> dict[str, Any] | None:
    """A copy of ``db_path`` if its quick_check passes (None otherwise): the backup
    API into a temporary file, fsync, rename over the previous copy."""
    db_path = Path(db_path)
    if not db_path.exists():
        return None
    ok, msgs = quick_check(db_path)
    if not ok:
        logger.warning("no last good copy of %s: quick_check: %s", db_path, "; ".join(msgs[:3]))
        return None
    dst, tmp = copy_path(db_path), db_path.with_name(db_path.name + ".last-good.tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        out = sqlite3.connect(str(tmp))
        try:
            src.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            out.close()
    finally:
        src.close()
    _fsync(tmp)
    meta = {"ts": time.time(), "source": str(db_path), "bytes": tmp.stat().st_size,
            "counts": table_counts(tmp)}
    mtmp = db_path.with_name(db_path.name + ".last-good.json.tmp")
    mtmp.write_text(json.dumps(meta))
    _fsync(mtmp)
    os.replace(tmp, dst)
    os.replace(mtmp, meta_path(db_path))
    _fsync(db_path.parent)
    return meta


def last_good_meta(db_path: Path) -> dict[str, Any] | None:
    if not copy_path(db_path).exists():
        return None
    try:
        return json.loads(meta_path(db_path).read_text())
    except (OSError, ValueError):
        st = copy_path(db_path).stat()
        return {"ts": st.st_mtime, "bytes": st.st_size, "counts": {}}


def _lost(before: dict[str, int | None], restored: dict[str, int | None]) -> dict[str, Any]:
    """Per table: rows in the damaged file (None: unreadable) and in the copy."""
    out = {}
    for t in sorted(set(before) | set(restored)):
        b, r = before.get(t), restored.get(t)
        if b != r:
            out[t] = {"damaged": b, "restored": r,
                      "lost": (b - r) if isinstance(b, int) and isinstance(r, int) else None}
    return out


def _keep_damaged(db_path: Path) -> Path:
    """A copy of the damaged file (and its WAL) for the technician."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    kept = db_path.with_name(f"{db_path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal"):
        src = db_path.with_name(db_path.name + suffix)
        if src.exists():
            shutil.copy2(src, kept.with_name(kept.name + suffix))
    return kept


def _describe(meta: dict, lost: dict) -> str:
    age = time.time() - float(meta.get("ts", 0))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(meta.get("ts", 0)))
    if not lost:
        what = "no row counts differ"
    else:
        what = ", ".join(
            f"{t} {v['damaged'] if v['damaged'] is not None else '?'} -> {v['restored']}"
            for t, v in list(lost.items())[:8])
    return (f"restored the last good copy of {when} ({age:.0f} s old); "
            f"row counts (damaged file -> restored): {what}")


def samples_dir_of(db_path: Path) -> Path:
    """Where the node keeps its sample files (``<data_dir>/samples``)."""
    return Path(db_path).parent / "samples"


def _with_salvage(kept: Path, base: Path, out: Path,
                  samples_dir: Path | None) -> dict[str, Any]:
    """:func:`db_salvage.build_restore`, never raising: on failure the report
    says why (and ``out`` is not written)."""
    try:
        return db_salvage.build_restore(kept, base, out, samples_dir)
    except Exception as err:  # a salvage that fails never stops the restore
        logger.exception("salvage of %s failed; restoring the copy alone", kept.name)
        return {"error": f"salvage failed: {err}", "tables": {}, "salvaged": {}, "lost": {},
                "samples": {}, "failed": True}


def restore_online(db_path: Path, samples_dir: Path | None = None) -> dict[str, Any]:
    """Restore the last good copy, plus every row the damaged file still gives,
    into the live database (other connections stay open); raises
    :class:`HealError` when there is no copy or SQLite refuses."""
    db_path = Path(db_path)
    meta = last_good_meta(db_path)
    if meta is None:
        raise HealError(f"no last good copy of {db_path.name} to restore")
    merged = db_path.with_name(db_path.name + ".restore.tmp")
    lock = _hold_writers(db_path)  # nothing written meanwhile is left out of the salvage
    try:
        before = table_counts(db_path)
        kept = _keep_damaged(db_path)
        salvage = _with_salvage(kept, copy_path(db_path), merged,
                                samples_dir if samples_dir is not None
                                else samples_dir_of(db_path))
    finally:
        _release(lock)
    source = copy_path(db_path) if salvage.get("failed") else merged
    try:
        _backup_into(source, db_path)
    finally:
        merged.unlink(missing_ok=True)
    restored = table_counts(db_path)
    lost = _lost(before, restored)
    return {"copy_ts": meta.get("ts"), "kept": str(kept), "lost": lost,
            "salvage": _brief(salvage),
            "detail": _describe(meta, lost) + "; " + db_salvage.describe(salvage)}


def _hold_writers(db_path: Path) -> sqlite3.Connection | None:
    """The live database's write lock, held while the damaged file is copied aside
    and salvaged, so no writer adds a row the salvage would miss (they wait on
    their busy timeout and write into the restored database); None when it
    cannot be had."""
    try:
        c = sqlite3.connect(str(db_path), timeout=5, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        return c
    except sqlite3.Error as err:
        logger.warning("salvage of %s without holding writers off: %s", db_path.name, err)
        return None


def _release(lock: sqlite3.Connection | None) -> None:
    if lock is None:
        return
    try:
        lock.execute("ROLLBACK")
    except sqlite3.Error:
        pass
    lock.close()


def _brief(rep: dict[str, Any]) -> dict[str, Any]:
    """The salvage report for the journal: per table read/inserted/updated/deleted/
    unreadable/lost, totals, samples re-imported."""
    return {"tables": rep.get("tables", {}), "salvaged": rep.get("salvaged", {}),
            "lost": rep.get("lost", {}), "samples": rep.get("samples", {}),
            "error": rep.get("error"), "cli": rep.get("cli"), "seconds": rep.get("seconds"),
            "schema_from_copy": rep.get("schema_from_copy", False),
            "leaf_rows": rep.get("leaf_rows", {})}


class LiveRestoreRefused(HealError):
    """SQLite refused the restore into the open database (seen: ``disk I/O error``
    after a file damaged under open connections): only a fresh start repairs it."""


def _backup_into(source: Path, db_path: Path) -> None:
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(str(db_path), timeout=30)
        try:
            dst.execute("PRAGMA busy_timeout=30000")
            src.backup(dst)
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            dst.close()
    except sqlite3.Error as err:
        raise LiveRestoreRefused(f"cannot restore into {db_path.name} while it is open "
                                 f"({err}); it is restored at the agent's next start") from err
    finally:
        src.close()


def guard_at_start(db_path: Path, samples_dir: Path | None = None) -> dict[str, Any] | None:
    """Before anything opens node.db: if it is damaged, move it aside and put the
    last good copy in its place. None when the file is fine (or absent); otherwise
    what was done, for the fault journal."""
    db_path = Path(db_path)
    if not db_path.exists():
        return None
    ok, msgs = quick_check(db_path)
    if ok:
        return None
    before = table_counts(db_path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    kept = db_path.with_name(f"{db_path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        p = db_path.with_name(db_path.name + suffix)
        if p.exists():
            os.replace(p, kept.with_name(kept.name + suffix))
    meta = last_good_meta(db_path)
    out: dict[str, Any] = {"problem": "; ".join(msgs[:5]), "kept": str(kept)}
    sdir = samples_dir if samples_dir is not None else samples_dir_of(db_path)
    if meta is None:
        empty = db_path.with_name(db_path.name + ".empty.tmp")
        empty.unlink(missing_ok=True)
        sqlite3.connect(str(empty)).close()
        salvage = _with_salvage(kept, empty, db_path, sdir)
        empty.unlink(missing_ok=True)
        if not salvage.get("failed") and salvage.get("salvaged"):
            out["salvage"] = _brief(salvage)
            out["detail"] = (f"{db_path.name} damaged ({out['problem']}) and no last good "
                             f"copy: started with what it still held; "
                             + db_salvage.describe(salvage)
                             + f"; the damaged one is {kept.name}")
            out["remedy"] = "salvaged the damaged database at start"
            logger.error("%s", out["detail"])
            return out
        db_path.unlink(missing_ok=True)
        out["detail"] = (f"{db_path.name} damaged ({out['problem']}) and no last good copy: "
                         f"started with an empty database; the damaged one is {kept.name}")
        out["remedy"] = "started with an empty database"
        logger.error("%s", out["detail"])
        return out
    salvage = _with_salvage(kept, copy_path(db_path), db_path, sdir)
    if salvage.get("failed"):
        tmp = db_path.with_name(db_path.name + ".restore.tmp")
        shutil.copyfile(copy_path(db_path), tmp)
        _fsync(tmp)
        os.replace(tmp, db_path)
    _fsync(db_path.parent)
    lost = _lost(before, table_counts(db_path))
    out.update(copy_ts=meta.get("ts"), lost=lost, salvage=_brief(salvage),
               detail=f"{db_path.name} damaged ({out['problem']}): "
               + _describe(meta, lost) + "; " + db_salvage.describe(salvage)
               + f"; the damaged one is {kept.name}")
    out["remedy"] = "restored the last good copy at start"
    logger.error("%s", out["detail"])
    return out


class DbIntegrityCheck(Check):
    """quick_check reads the whole file: on a big node.db the interval grows so the
    check costs at most :attr:`max_duty` of a core (the management plane's budget)."""

    name = "db_integrity"
    interval_s = 10.0
    max_duty = 0.005

    def __init__(self, db_path: Path, backup_interval_s: float = BACKUP_INTERVAL_S,
                 interval_s: float | None = None, backups: bool = True,
                 samples_dir: Path | None = None,
                 restart: Callable[[str], None] | None = None,
                 restart_after: int = 2) -> None:
        """``restart(why)``: how to have the agent started again (under systemd: a
        clean stop, ``Restart=always`` starts it) when the live restore failed
        ``restart_after`` times running, or at once when SQLite refused to write into
        the open file (:class:`LiveRestoreRefused`); the damaged file is then
        restored before anything opens it (:func:`guard_at_start`). None: keep
        trying live."""
        self.restart, self.restart_after = restart, restart_after
        self._failed_restores = 0
        self.db_path = Path(db_path)
        self.samples_dir = samples_dir
        #: the last restore's report, carried by the next ok probe (so the monitor
        #: journals it with the ``healed`` row)
        self._restored: dict[str, Any] | None = None
        self.backup_interval_s = backup_interval_s
        self.backups = backups
        if interval_s is not None:
            self.interval_s = interval_s
        self.base_interval_s = self.interval_s

    def probe(self) -> Finding:
        t0 = time.monotonic()
        if not self.db_path.exists():
            return Finding(self.name, True, f"{self.db_path.name} not created yet",
                           data={"path": str(self.db_path)})
        ok, msgs = quick_check(self.db_path)
        took = time.monotonic() - t0
        self.interval_s = max(self.base_interval_s, took / self.max_duty)
        meta = last_good_meta(self.db_path)
        data = {"path": str(self.db_path), "ms": round((time.monotonic() - t0) * 1000, 1),
                "last_good_ts": meta.get("ts") if meta else None,
                "last_good_age_s": round(time.time() - meta["ts"], 1) if meta else None}
        if ok:
            if self._restored is not None:
                data.update(self._restored)
                self._restored = None
            return Finding(self.name, True, "quick_check: ok" + (
                f"; last good copy {data['last_good_age_s']:.0f} s old" if meta
                else "; no last good copy yet"), data=data)
        return Finding(self.name, False, f"quick_check: {'; '.join(msgs[:3])}",
                       fault="db_corrupt", data={**data, "messages": msgs[:20]})

    def heal(self, finding: Finding) -> str:
        try:
            r = restore_online(self.db_path, self.samples_dir)
        except HealError as err:
            self._failed_restores += 1
            if self.restart is None or (self._failed_restores < self.restart_after
                                        and not isinstance(err, LiveRestoreRefused)):
                raise
            why = (f"node.db could not be restored while the agent runs "
                   f"({self._failed_restores} tries: {err}); restarting the agent, which "
                   "restores it before anything opens it")
            logger.critical("%s", why)
            self.restart(why)
            raise HealError(why) from None
        self._failed_restores = 0
        finding.data.update({"lost": r["lost"], "kept": r["kept"], "copy_ts": r["copy_ts"],
                             "salvage": r["salvage"]})
        self._restored = {k: finding.data[k] for k in ("lost", "kept", "copy_ts", "salvage")}
        return r["detail"] + f"; the damaged file is kept as {Path(r['kept']).name}"

    def after_ok(self, finding: Finding) -> None:
        if not self.backups or not self.db_path.exists():
            return
        age = finding.data.get("last_good_age_s")
        if age is None or age >= self.backup_interval_s:
            make_last_good(self.db_path)

    def backup_now(self) -> dict[str, Any] | None:
        return make_last_good(self.db_path)
