"""Salvage a damaged node.db before its last good copy replaces it.

Corruption usually hits a few pages: most rows of the damaged file can still be
read. Restoring the copy alone would lose every fact written since it was made
(outbox rows not yet sent, samples, labels, journal rows). So the restore is
built as *the copy plus every row the damaged file can still give*:

1. **Read** (:func:`salvage`): table by table, from the schema on page 1. Where
   an index of the table can be read (it usually can: every node.db table has
   one), it lists every rowid -- and the key -- the table holds, even those on
   damaged pages; the rows are then read by rowid ranges, and a range that hits
   a damaged page is cut in two until the bad rows are isolated, so one bad page
   costs only its own rows, which are then known by rowid and key. Without a
   readable index the reader bisects the rowid space itself (the rows lost are
   then counted from ``count(*)`` where it answers, else unknown). Leaf pages cut
   off from their table by a damaged interior page are read straight off the
   file (:func:`scan_leaves`). Append-only tables (:data:`APPEND_ONLY`) are read
   above the copy's largest rowid only. A schema that cannot be read is read
   with the copy's schema pages spliced in (:func:`salvage`). The ``sqlite3``
   command line's ``.recover``, where it works (Debian's 3.40 build does not),
   adds rows the reader could not reach. Everything tolerates
   :class:`sqlite3.DatabaseError`.
2. **Merge** (:func:`merge`) into a copy of the last good copy, per table by its
   key -- the declared primary key, else the first unique index (the outbox: its
   ``msg_id``), else the rowid:
   - a key only in the damaged file: inserted (with its rowid when free, so the
     outbox keeps its order);
   - a key in both: the damaged file's row wins (it is the newer state of the
     same row), except that an outbox row never goes back from ``acked`` or
     ``rejected`` to ``pending`` (nothing acked is sent again);
   - a key only in the copy: deleted only when the damaged file is known not to
     hold it any more (its rowid was readable, and the key is not among the lost
     ones); otherwise the copy's row stays.
   Running the merge twice changes nothing the second time.
3. **Samples** (:func:`reimport_samples`): a file under ``samples/`` with no row
   after the merge is imported again -- with its metadata from its feedback
   message when the outbox row was salvaged, else as a bare, local-only,
   unlabelled sample (``app`` ``unknown``), listed with the reason. A sample
   whose outbox row was lost is marked unqueued, so the next start queues it
   again (the cloud dedups by ``msg_id``).

The report says, per table: rows read, inserted, updated, deleted, unreadable,
and lost (unreadable and not in the copy either).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OUTBOX = "cloud_sync_outbox"
FINAL_STATES = ("acked", "rejected")
MIN_ROWID, MAX_ROWID = -(2 ** 63), 2 ** 63 - 1
#: queries one table's bisection may spend before the rest is counted unreadable
MAX_QUERIES = 200_000
#: tables only ever appended to (and pruned oldest first), never updated: only their
#: rows newer than the copy (rowid above its largest) are read -- ``results`` grows
#: by every inference and would cost the salvage seconds and hundreds of MB
APPEND_ONLY = ("results", "faults")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class TableSalvage:
    name: str
    cols: list[str]
    rows: dict[int, tuple] = field(default_factory=dict)  # rowid -> values (cols order)
    #: rowids known to exist but unreadable (index mode); None: not known (bisect mode)
    lost_rowids: set[int] | None = None
    #: rowid ranges read completely (bisect mode): a rowid in one of them and not
    #: in ``rows`` does not exist in the damaged file
    covered: list[tuple[int, int]] = field(default_factory=list)
    #: keys of the lost rows, where the index holds the key: rowid -> key tuple
    lost_keys: dict[int, tuple] = field(default_factory=dict)
    key: list[str] = field(default_factory=list)  # the key columns ("rowid": the rowid)
    count: int | None = None  # count(*) in the damaged file, where it answered
    method: str = "index"
    error: str | None = None
    queries: int = 0
    #: only rowids above this one were read (an append-only table: the rest is the copy's)
    min_rowid: int | None = None

    @property
    def unreadable(self) -> int | None:
        if self.lost_rowids is not None:
            return len(self.lost_rowids)
        if self.count is not None:
            return max(0, self.count - len(self.rows))
        return None if self.error or self._has_gaps() else 0

    def _has_gaps(self) -> bool:
        return _uncovered(self.covered) != []

    def readable(self, rowid: int) -> bool:
        """True when the damaged file is known to hold (or not hold) ``rowid``."""
        if self.min_rowid is not None and rowid <= self.min_rowid:
            return False  # not read: the copy's row stands
        if rowid in self.rows:
            return True
        if self.lost_rowids is not None:
            return rowid not in self.lost_rowids
        return any(a <= rowid <= b for a, b in self.covered)

    def missing(self, rowid: int) -> bool:
        """A rowid the reader could not read (and should have)."""
        return (rowid not in self.rows and not self.readable(rowid)
                and (self.min_rowid is None or rowid > self.min_rowid))

    def complete(self) -> bool:
        return self.error is None and self.unreadable == 0


def _uncovered(covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, nxt = [], MIN_ROWID
    for a, b in sorted(covered):
        if a > nxt:
            out.append((nxt, a - 1))
        nxt = max(nxt, b + 1) if b < MAX_ROWID else MAX_ROWID + 1
    if nxt <= MAX_ROWID:
        out.append((nxt, MAX_ROWID))
    return out


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str, str | None]]:
    return [tuple(r) for r in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")]


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, int]]:
    """(name, declared type, pk position) per column."""
    return [(r[1], r[2], r[5]) for r in conn.execute(f"PRAGMA table_info({_q(table)})")]


def _indexes(conn: sqlite3.Connection, table: str) -> list[tuple[str, bool, list[str]]]:
    """(name, unique, columns) of the table's full indexes."""
    out = []
    for r in conn.execute(f"PRAGMA index_list({_q(table)})"):
        name, unique, partial = r[1], bool(r[2]), r[4] if len(r) > 4 else 0
        if partial:
            continue
        cols = [c[2] for c in conn.execute(f"PRAGMA index_info({_q(name)})")]
        if cols and all(c is not None for c in cols):
            out.append((name, unique, cols))
    return out


def table_key(conn: sqlite3.Connection, table: str) -> list[str]:
    """What identifies a row: the declared primary key (``rowid`` when it is the
    rowid's alias), else the first unique index, else the rowid."""
    cols = _columns(conn, table)
    pk = [c[0] for c in sorted((c for c in cols if c[2]), key=lambda c: c[2])]
    rowid_alias = len(pk) == 1 and any(c[0] == pk[0] and c[1].upper() == "INTEGER"
                                       for c in cols)
    if pk and not rowid_alias:
        return pk
    for _name, unique, icols in _indexes(conn, table):
        if unique:
            return icols
    return ["rowid"]


def _read_by_rowids(conn, ts: TableSalvage, rowids: list[int]) -> None:
    """Rows of the sorted ``rowids``, by ranges; a failing range is halved until
    its bad rows stand alone (they go to ``lost_rowids``)."""
    sel = f"SELECT rowid, {', '.join(_q(c) for c in ts.cols)} FROM {_q(ts.name)} " \
          "WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
    ts.lost_rowids = set()
    stack = [(0, len(rowids) - 1)] if rowids else []
    while stack:
        i, j = stack.pop()
        ts.queries += 1
        last = None
        try:
            for r in conn.execute(sel, (rowids[i], rowids[j])):
                ts.rows[r[0]] = tuple(r[1:])
                last = r[0]
            continue
        except sqlite3.DatabaseError:
            pass
        while i <= j and last is not None and rowids[i] <= last:
            i += 1  # read before the error
        if i > j:
            continue
        if i == j or ts.queries > MAX_QUERIES:
            ts.lost_rowids.update(r for r in rowids[i:j + 1] if r not in ts.rows)
            continue
        mid = (i + j) // 2
        stack.append((mid + 1, j))
        stack.append((i, mid))


def _read_by_bisection(conn, ts: TableSalvage) -> None:
    """No index to list the rowids: bisect the rowid space itself."""
    ts.method = "bisect"
    sel = f"SELECT rowid, {', '.join(_q(c) for c in ts.cols)} FROM {_q(ts.name)} " \
          "WHERE rowid BETWEEN ? AND ? ORDER BY rowid"
    lo = MIN_ROWID if ts.min_rowid is None else ts.min_rowid + 1
    if lo > MIN_ROWID:
        ts.covered.append((MIN_ROWID, lo - 1))  # not read on purpose: the copy's rows
    stack = [(lo, MAX_ROWID)]
    while stack:
        a, b = stack.pop()
        ts.queries += 1
        last = None
        try:
            for r in conn.execute(sel, (a, b)):
                ts.rows[r[0]] = tuple(r[1:])
                last = r[0]
            ts.covered.append((a, b))
            continue
        except sqlite3.DatabaseError:
            pass
        if last is not None:
            ts.covered.append((a, last))
            a = last + 1
        if a > b or a == b or ts.queries > MAX_QUERIES:
            continue  # unreadable (not covered)
        mid = a + (b - a) // 2
        stack.append((mid + 1, b))
        stack.append((a, mid))


def _index_rowids(conn, table: str, key: list[str]) -> tuple[list[int], dict[int, tuple]] | None:
    """Every rowid of ``table`` (and its key, where the index holds it) from the
    first index that can be read whole; None when none can."""
    idx = _indexes(conn, table)
    idx.sort(key=lambda x: x[2] != key)  # the key's own index first
    for name, _unique, icols in idx:
        want = [c for c in key if c != "rowid"]
        has_key = all(c in icols for c in want)
        cols = ", ".join(["rowid"] + ([_q(c) for c in want] if has_key else []))
        try:
            rows = conn.execute(
                f"SELECT {cols} FROM {_q(table)} INDEXED BY {_q(name)}").fetchall()
        except sqlite3.DatabaseError:
            continue
        keys = {r[0]: (tuple(r[1:]) if want else (r[0],)) for r in rows} \
            if (has_key or not want) else {}
        return sorted(r[0] for r in rows), keys
    return None


def read_table(conn: sqlite3.Connection, table: str,
               min_rowid: int | None = None) -> TableSalvage:
    """What ``table`` of the damaged file still gives (only rowids above
    ``min_rowid`` when given)."""
    ts = TableSalvage(table, [], min_rowid=min_rowid)
    try:
        ts.cols = [c[0] for c in _columns(conn, table)]
        ts.key = table_key(conn, table)
    except sqlite3.DatabaseError as err:
        ts.error = str(err)
        return ts
    try:
        ts.count = conn.execute(f"SELECT count(*) FROM {_q(table)}").fetchone()[0]
    except sqlite3.DatabaseError:
        ts.count = None
    listed = _index_rowids(conn, table, ts.key)
    if listed is not None and (ts.count is None or len(listed[0]) == ts.count):
        rowids, keys = listed
        if min_rowid is not None:
            rowids = [r for r in rowids if r > min_rowid]
        _read_by_rowids(conn, ts, rowids)
        ts.lost_keys = {r: keys[r] for r in ts.lost_rowids if r in keys}
    else:
        _read_by_bisection(conn, ts)
    if min_rowid is not None:
        ts.count = None  # of the whole table: says nothing of the rows read
    return ts


# -- leaf pages cut off from their table (a damaged interior page) -----------------
def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = 0
    for k in range(8):
        c = b[i + k]
        v = (v << 7) | (c & 0x7F)
        if not c & 0x80:
            return v, i + k + 1
    return (v << 8) | b[i + 8], i + 9


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def _record(payload: bytes) -> list:
    hsize, i = _varint(payload, 0)
    types = []
    while i < hsize:
        t, i = _varint(payload, i)
        types.append(t)
    out, j = [], hsize
    for t in types:
        if t == 0:
            out.append(None)
        elif 1 <= t <= 6:
            n = (1, 2, 3, 4, 6, 8)[t - 1]
            out.append(_signed(int.from_bytes(payload[j:j + n], "big"), 8 * n))
            j += n
        elif t == 7:
            out.append(struct.unpack(">d", payload[j:j + 8])[0])
            j += 8
        elif t in (8, 9):
            out.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = payload[j:j + n]
            if len(raw) != n:
                raise ValueError("short record")
            out.append(bytes(raw) if t % 2 == 0 else raw.decode("utf-8"))
            j += n
        else:
            raise ValueError(f"serial type {t}")
    if j > len(payload):
        raise ValueError("short record")
    return out


class _Pages:
    """The damaged file's pages as SQLite would see them: the WAL's last committed
    frame of a page over the main file's."""

    def __init__(self, path: Path, page_size: int) -> None:
        self.size = page_size
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.n = os.fstat(self.f.fileno()).st_size // page_size
        self.wal: dict[int, bytes] = {}
        wal = path.with_name(path.name + "-wal")
        try:
            data = wal.read_bytes() if wal.exists() else b""
        except OSError:
            data = b""
        if len(data) >= 32 and int.from_bytes(data[8:12], "big") == page_size:
            salts, frames, pending, off = data[16:24], {}, {}, 32
            while off + 24 + page_size <= len(data):
                pg, commit = (int.from_bytes(data[off:off + 4], "big"),
                              int.from_bytes(data[off + 4:off + 8], "big"))
                if data[off + 8:off + 16] != salts:
                    break
                pending[pg] = data[off + 24:off + 24 + page_size]
                if commit:
                    frames.update(pending)
                    pending = {}
                off += 24 + page_size
            self.wal = frames
            self.n = max([self.n, *frames]) if frames else self.n

    def get(self, pg: int) -> bytes:
        if pg in self.wal:
            return self.wal[pg]
        self.f.seek((pg - 1) * self.size)
        return self.f.read(self.size)

    def close(self) -> None:
        self.f.close()


def _freelist(pages: _Pages, header: bytes) -> set[int] | None:
    """The free pages (stale rows live there); None when the list cannot be walked."""
    free: set[int] = set()
    trunk, left = int.from_bytes(header[32:36], "big"), int.from_bytes(header[36:40], "big")
    while trunk:
        if trunk > pages.n or trunk in free:
            return None
        free.add(trunk)
        b = pages.get(trunk)
        nxt, k = int.from_bytes(b[0:4], "big"), int.from_bytes(b[4:8], "big")
        if k > pages.size // 4 - 2:
            return None
        free.update(int.from_bytes(b[8 + 4 * x:12 + 4 * x], "big") for x in range(k))
        trunk = nxt
    return free if len(free) >= left else None


def _fits(ts: TableSalvage, types: list[str], values: list) -> bool:
    if len(values) > len(ts.cols):
        return False
    for t, v in zip(types, values):
        t = t.upper()
        if v is None:
            continue
        if "INT" in t and not isinstance(v, int):
            return False
        if any(x in t for x in ("CHAR", "CLOB", "TEXT")) and not isinstance(v, str):
            return False
        if any(x in t for x in ("REAL", "FLOA", "DOUB")) and not isinstance(v, (int, float)):
            return False
        if t == "BLOB" and not isinstance(v, bytes):
            return False
    return True


def _leaf_rowids(b: bytes) -> list[int] | None:
    """The rowids of a table leaf page (cheap: no record decoded); None if not one."""
    if len(b) < 8 or b[0] != 0x0D:
        return None
    n = int.from_bytes(b[3:5], "big")
    if 8 + 2 * n > len(b):
        return None
    out = []
    for c in range(n):
        off = int.from_bytes(b[8 + 2 * c:10 + 2 * c], "big")
        _size, i = _varint(b, off)
        rowid, _i = _varint(b, i)
        out.append(_signed(rowid, 64))
    return out


def _leaf_cells(pages: _Pages, pg: int, usable: int) -> list[tuple[int, list]] | None:
    """(rowid, values) of a table leaf page; None when it is not one."""
    b = pages.get(pg)
    if len(b) < 8 or b[0] != 0x0D:
        return None
    n = int.from_bytes(b[3:5], "big")
    if 8 + 2 * n > len(b):
        return None
    out = []
    x = usable - 35
    m = ((usable - 12) * 32 // 255) - 23
    for c in range(n):
        off = int.from_bytes(b[8 + 2 * c:10 + 2 * c], "big")
        size, i = _varint(b, off)
        rowid, i = _varint(b, i)
        rowid = _signed(rowid, 64)
        if size <= x:
            payload = b[i:i + size]
        else:
            k = m + ((size - m) % (usable - 4))
            local = k if k <= x else m
            payload = bytearray(b[i:i + local])
            nxt = int.from_bytes(b[i + local:i + local + 4], "big")
            seen = set()
            while nxt and len(payload) < size:
                if nxt > pages.n or nxt in seen:
                    raise ValueError("bad overflow chain")
                seen.add(nxt)
                ob = pages.get(nxt)
                payload += ob[4:usable]
                nxt = int.from_bytes(ob[0:4], "big")
            payload = bytes(payload[:size])
        if len(payload) != size:
            raise ValueError("short payload")
        out.append((rowid, _record(payload)))
    return out


def scan_leaves(damaged: Path, tables: dict[str, TableSalvage], owners: dict[int, str],
                types: dict[str, list[str]], aliases: dict[str, int | None]) -> dict[str, int]:
    """Rows the reader could not reach (their leaf page is whole but a page above it
    is not) read straight off the leaf pages: a page is given to the table that
    owned it in the last good copy (``owners``), else to the one table whose
    columns fit every cell; free pages are skipped, and only rowids the reader
    could not read are filled. Rows added per table."""
    added: dict[str, int] = {}
    want = {n: ts for n, ts in tables.items() if ts.cols and not ts.complete()}
    if not want:
        return added
    with open(damaged, "rb") as f:
        header = f.read(100)
    if header[:16] != b"SQLite format 3\x00":
        return added
    size = int.from_bytes(header[16:18], "big")
    size = 65536 if size == 1 else size
    usable = size - header[20]
    pages = _Pages(damaged, size)
    try:
        free = _freelist(pages, pages.get(1)[:100]) or set()
        for pg in range(2, pages.n + 1):
            if pg in free:
                continue
            try:
                rowids = _leaf_rowids(pages.get(pg))
                if not rowids:
                    continue
                cands = [owners[pg]] if owners.get(pg) in want else list(want)
                if not any(want[t].missing(r) for t in cands for r in rowids):
                    continue  # nothing on it the reader has not read
                cells = _leaf_cells(pages, pg, usable)
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
            if not cells:
                continue
            fit = [t for t in cands if all(
                _fits(want[t], types[t], v) and (owners.get(pg) == t or len(v) == len(
                    want[t].cols)) for _r, v in cells)]
            fit = [t for t in fit if any(want[t].missing(r) for r, _v in cells)]
            if len(fit) != 1:
                continue
            ts = want[fit[0]]
            alias = aliases.get(ts.name)
            for rowid, vals in cells:
                if not ts.missing(rowid):
                    continue
                vals = vals + [None] * (len(ts.cols) - len(vals))
                if alias is not None and vals[alias] is None:
                    vals[alias] = rowid
                ts.rows[rowid] = tuple(vals)
                if ts.lost_rowids is not None:
                    ts.lost_rowids.discard(rowid)
                    ts.lost_keys.pop(rowid, None)
                else:
                    ts.covered.append((rowid, rowid))
                added[ts.name] = added.get(ts.name, 0) + 1
    finally:
        pages.close()
    return added


def _page_owners(copy: Path | None) -> dict[int, str]:
    if copy is None or not Path(copy).exists():
        return {}
    try:
        c = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            return {r[0]: r[1] for r in c.execute(
                "SELECT pageno, name FROM dbstat WHERE pagetype IN ('leaf', 'internal')")}
        finally:
            c.close()
    except sqlite3.Error:
        return {}


# -- the sqlite3 command line's .recover (optional) ------------------------------
_CLI_OK: bool | None = None


def cli_recover_available() -> bool:
    """Whether a ``sqlite3`` command line whose ``.recover`` works is on PATH."""
    global _CLI_OK
    if _CLI_OK is None:
        exe = shutil.which("sqlite3")
        _CLI_OK = False
        if exe:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "probe.db"
                c = sqlite3.connect(p)
                c.execute("CREATE TABLE t(a)")
                c.execute("INSERT INTO t VALUES (42)")
                c.commit()
                c.close()
                try:
                    r = subprocess.run([exe, str(p), ".recover"], capture_output=True,
                                       text=True, timeout=30, check=False)
                    _CLI_OK = r.returncode == 0 and "42" in r.stdout and "error" not in r.stderr
                except (OSError, subprocess.SubprocessError):
                    _CLI_OK = False
    return _CLI_OK


def _cli_recover(damaged: Path, tables: dict[str, TableSalvage]) -> int:
    """Rows ``.recover`` finds at rowids the reader lost; how many were added."""
    if not cli_recover_available():
        return 0
    added = 0
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "recovered.db"
        try:
            sql = subprocess.run([shutil.which("sqlite3") or "sqlite3", str(damaged), ".recover"],
                                 capture_output=True, text=True, timeout=300, check=False).stdout
            rc = sqlite3.connect(out)
            rc.executescript(sql)
        except (OSError, subprocess.SubprocessError, sqlite3.Error) as err:
            logger.warning("sqlite3 .recover of %s failed: %s", damaged.name, err)
            return 0
        try:
            for ts in tables.values():
                if ts.complete() or not ts.cols:
                    continue
                try:
                    rows = rc.execute(f"SELECT rowid, {', '.join(_q(c) for c in ts.cols)} "
                                      f"FROM {_q(ts.name)}").fetchall()
                except sqlite3.Error:
                    continue
                for r in rows:
                    if ts.missing(r[0]):
                        ts.rows[r[0]] = tuple(r[1:])
                        if ts.lost_rowids is not None:
                            ts.lost_rowids.discard(r[0])
                            ts.lost_keys.pop(r[0], None)
                        added += 1
        finally:
            rc.close()
    return added


def _splice_schema(damaged: Path, copy: Path, scratch: Path) -> None:
    """``scratch``: the damaged file with the copy's schema pages (page 1 and the
    rest of ``sqlite_schema``) put back. The backup API copies page for page, so
    tables keep their root pages; valid while the schema has not changed since
    the copy (a table made since is not found). The header's page count is the
    damaged file's, so its newer pages stay in range."""
    c = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        size = c.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in c.execute(
            "SELECT pageno FROM dbstat WHERE name IN ('sqlite_schema', 'sqlite_master')")]
    finally:
        c.close()
    shutil.copyfile(damaged, scratch)
    wal = damaged.with_name(damaged.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, scratch.with_name(scratch.name + "-wal"))
    with open(copy, "rb") as src, open(scratch, "r+b") as dst:
        for p in pages or [1]:
            src.seek((p - 1) * size)
            dst.seek((p - 1) * size)
            dst.write(src.read(size))
        n = os.fstat(dst.fileno()).st_size // size
        dst.seek(28)
        dst.write(n.to_bytes(4, "big"))


def salvage(damaged: Path, use_cli: bool = True, copy: Path | None = None) -> dict[str, Any]:
    """Everything the damaged file can still give: ``{"tables": {name:
    TableSalvage}, "schema": [...], "error": str | None, "cli_rows": int,
    "schema_from_copy": bool}``. When its schema cannot be read and ``copy`` (the
    last good copy) is given, the copy's schema pages are spliced into a scratch
    copy of it and that is read."""
    out = _salvage(damaged, use_cli, copy)
    if out["error"] and copy is not None and Path(copy).exists():
        with tempfile.TemporaryDirectory(dir=Path(damaged).parent) as d:
            scratch = Path(d) / "spliced.db"
            try:
                _splice_schema(Path(damaged), Path(copy), scratch)
            except (OSError, sqlite3.Error) as err:
                logger.warning("could not splice the copy's schema into %s: %s",
                               Path(damaged).name, err)
                return out
            first = out["error"]
            out = _salvage(scratch, use_cli, copy)
            out["schema_from_copy"] = True
            out["schema_error"] = first
    return out


def _append_only_floors(copy: Path | None) -> dict[str, int]:
    """The copy's largest rowid of each :data:`APPEND_ONLY` table it has."""
    out: dict[str, int] = {}
    if copy is None or not Path(copy).exists():
        return out
    try:
        c = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            for t in APPEND_ONLY:
                try:
                    out[t] = c.execute(f"SELECT coalesce(max(rowid), 0) FROM {_q(t)}"
                                       ).fetchone()[0]
                except sqlite3.Error:
                    continue
        finally:
            c.close()
    except sqlite3.Error:
        pass
    return out


def _salvage(damaged: Path, use_cli: bool = True, copy: Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"tables": {}, "schema": [], "error": None, "cli_rows": 0,
                           "schema_from_copy": False, "leaf_rows": {}}
    types: dict[str, list[str]] = {}
    aliases: dict[str, int | None] = {}
    floors = _append_only_floors(copy)
    try:
        conn = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as err:
        out["error"] = str(err)
        return out
    try:
        try:
            out["schema"] = _schema(conn)
        except sqlite3.DatabaseError as err:
            out["error"] = f"schema unreadable: {err}"
            return out
        for typ, name, _tbl, sql in out["schema"]:
            if typ == "table" and not name.startswith("sqlite_") and sql \
                    and "VIRTUAL" not in sql.upper():
                out["tables"][name] = read_table(conn, name, floors.get(name))
                try:
                    cols = _columns(conn, name)
                    types[name] = [c[1] for c in cols]
                    pk = [k for k, c in enumerate(cols) if c[2]]
                    aliases[name] = pk[0] if len(pk) == 1 and \
                        cols[pk[0]][1].upper() == "INTEGER" else None
                except sqlite3.Error:
                    types[name], aliases[name] = [], None
    finally:
        conn.close()
    try:
        out["leaf_rows"] = scan_leaves(damaged, out["tables"], _page_owners(copy), types, aliases)
    except (OSError, ValueError) as err:
        logger.warning("leaf page scan of %s failed: %s", Path(damaged).name, err)
    if use_cli:
        out["cli_rows"] = _cli_recover(damaged, out["tables"])
    return out


# -- merge ----------------------------------------------------------------------
def _key_of(ts: TableSalvage, rowid: int, values: tuple) -> tuple:
    return tuple(rowid if k == "rowid" else values[ts.cols.index(k)] for k in ts.key)


def merge(target: sqlite3.Connection, salv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge the salvaged rows into ``target`` (a copy of the last good copy); per
    table what was done. Idempotent."""
    report: dict[str, dict[str, Any]] = {}
    existing = {r[0] for r in target.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    for typ, name, tbl, sql in salv["schema"]:  # tables and indexes made since the copy
        if not sql or name.startswith("sqlite_"):
            continue
        if typ == "table" and name not in existing:
            target.execute(sql)
            existing.add(name)
    for typ, name, tbl, sql in salv["schema"]:
        if typ == "index" and sql:
            try:
                target.execute(sql.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1)
                               .replace("CREATE UNIQUE INDEX",
                                        "CREATE UNIQUE INDEX IF NOT EXISTS", 1))
            except sqlite3.Error:
                pass
    for name, ts in salv["tables"].items():
        if ts.error or not ts.cols:
            report[name] = {"read": 0, "inserted": 0, "updated": 0, "deleted": 0,
                            "unreadable": None, "lost": None, "error": ts.error}
            continue
        report[name] = _merge_table(target, ts)
    return report


def _merge_table(target: sqlite3.Connection, ts: TableSalvage) -> dict[str, Any]:
    t = _q(ts.name)
    have = {c[0]: c for c in _columns(target, ts.name)}
    for c in ts.cols:  # a column added by a migration since the copy
        if c not in have:
            target.execute(f"ALTER TABLE {t} ADD COLUMN {_q(c)}")
    key_sql = ", ".join("rowid" if k == "rowid" else _q(k) for k in ts.key)
    cur: dict[tuple, int] = {}  # key -> rowid in the target
    floor = "" if ts.min_rowid is None else f" WHERE rowid > {int(ts.min_rowid)}"
    for r in target.execute(f"SELECT rowid, {key_sql} FROM {t}{floor}"):
        cur[tuple(r[1:])] = r[0]
    salvaged = {_key_of(ts, rid, vals): (rid, vals) for rid, vals in ts.rows.items()}
    lost_keys = set(ts.lost_keys.values())
    keys_known = ts.lost_rowids is not None and (
        ts.key == ["rowid"] or len(ts.lost_keys) == len(ts.lost_rowids))
    n = {"read": len(ts.rows), "inserted": 0, "updated": 0, "deleted": 0, "kept_from_copy": 0,
         "unreadable": ts.unreadable, "lost": None, "method": ts.method}
    # 1. keys only in the copy: deleted since, where the damaged file says so
    for k, rid in list(cur.items()):
        if k in salvaged:
            continue
        gone = (ts.min_rowid is None and ts.complete()
                or (keys_known and k not in lost_keys and ts.readable(rid))
                or (ts.key == ["rowid"] and ts.readable(rid)))
        if gone:
            target.execute(f"DELETE FROM {t} WHERE rowid = ?", [rid])
            del cur[k]
            n["deleted"] += 1
        else:
            n["kept_from_copy"] += 1
    cols_sql = ", ".join(_q(c) for c in ts.cols)
    state_i = ts.cols.index("state") if ts.name == OUTBOX and "state" in ts.cols else None
    # 2. keys in both: the damaged file's row wins (an outbox row never goes back)
    # 3. keys only in the damaged file: inserted, with their rowid when it is free
    for k, (rid, vals) in sorted(salvaged.items(), key=lambda kv: kv[1][0]):
        if k in cur:
            row = target.execute(f"SELECT {cols_sql} FROM {t} WHERE rowid = ?",
                                 [cur[k]]).fetchone()
            if row is None or tuple(row) == tuple(vals):
                continue
            if state_i is not None and row[state_i] in FINAL_STATES \
                    and vals[state_i] not in FINAL_STATES:
                continue
            sets = ", ".join(f"{_q(c)} = ?" for c in ts.cols)
            try:
                target.execute(f"UPDATE {t} SET {sets} WHERE rowid = ?", [*vals, cur[k]])
                n["updated"] += 1
            except sqlite3.IntegrityError as err:
                n.setdefault("conflicts", []).append(f"{k}: {err}")
            continue
        free = target.execute(f"SELECT 1 FROM {t} WHERE rowid = ?", [rid]).fetchone() is None
        try:
            if free:
                target.execute(f"INSERT INTO {t} (rowid, {cols_sql}) VALUES "
                               f"({', '.join('?' * (len(vals) + 1))})", [rid, *vals])
            else:
                pk_alias = [c for c in ts.cols if _is_rowid_alias(target, ts.name, c)]
                cols2 = [c for c in ts.cols if c not in pk_alias]
                vals2 = [v for c, v in zip(ts.cols, vals) if c not in pk_alias]
                target.execute(f"INSERT INTO {t} ({', '.join(_q(c) for c in cols2)}) VALUES "
                               f"({', '.join('?' * len(vals2))})", vals2)
            cur[k] = rid
            n["inserted"] += 1
        except sqlite3.IntegrityError as err:
            n.setdefault("conflicts", []).append(f"{k}: {err}")
    # lost: unreadable rows the copy does not hold either
    if ts.lost_rowids is not None and (keys_known or ts.key == ["rowid"]):
        lk = ts.lost_keys if ts.key != ["rowid"] else {r: (r,) for r in ts.lost_rowids}
        n["lost"] = sum(1 for k in lk.values() if k not in cur)
        n["lost_keys"] = sorted(str(k[0]) if len(k) == 1 else str(k)
                                for k in lk.values() if k not in cur)[:50]
    else:
        n["lost"] = ts.unreadable  # an upper bound: some may be in the copy
    return n


def _is_rowid_alias(conn: sqlite3.Connection, table: str, col: str) -> bool:
    cols = _columns(conn, table)
    pk = [c for c in cols if c[2]]
    return len(pk) == 1 and pk[0][0] == col and pk[0][1].upper() == "INTEGER"


# -- samples on disk --------------------------------------------------------------
_EXT_TYPE = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "npy": "tensor/npy"}


def _feedback_meta(target: sqlite3.Connection) -> dict[str, dict]:
    """sample_id -> its feedback message's sample, from the outbox."""
    out: dict[str, dict] = {}
    try:
        rows = target.execute(f"SELECT payload FROM {OUTBOX} WHERE kind = 'feedback'")
        for (payload,) in rows:
            try:
                s = json.loads(payload)["sample"]
                out[s["sample_id"]] = s
            except (ValueError, KeyError, TypeError):
                continue
    except sqlite3.Error:
        pass
    return out


def reimport_samples(target: sqlite3.Connection, samples_dir: Path | None,
                     outbox_lost: set[str] | None = None) -> dict[str, Any]:
    """Sample files with no row get one again; samples whose upload was lost with
    the outbox are marked unqueued (the next start queues them again)."""
    rep: dict[str, Any] = {"files": 0, "reimported": 0, "from_outbox": 0, "bare": 0,
                           "requeued": 0, "ids": []}
    try:
        cols = {c[0] for c in _columns(target, "samples")}
    except sqlite3.Error:
        return rep
    if not cols:
        return rep
    if outbox_lost:
        try:
            q = ",".join("?" * len(outbox_lost))
            rep["requeued"] = target.execute(
                f"UPDATE samples SET queued = NULL WHERE msg_id IN ({q}) "
                "AND coalesce(shared, '') != 'none'", list(outbox_lost)).rowcount
        except sqlite3.Error:
            pass
    if samples_dir is None or not Path(samples_dir).is_dir():
        return rep
    known = {r[0] for r in target.execute("SELECT sample_id FROM samples")}
    paths = {r[0] for r in target.execute("SELECT input_path FROM samples")}
    meta = None
    now = time.time()
    for f in sorted(Path(samples_dir).iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        rep["files"] += 1
        sid, ext = f.stem, f.suffix.lstrip(".").lower()
        if sid in known or str(f) in paths or ext not in _EXT_TYPE:
            continue
        if meta is None:
            meta = _feedback_meta(target)
        st = f.stat()
        row = {"sample_id": sid, "created_at": st.st_mtime, "app": "unknown", "version": "",
               "reason": "reimported after db_corrupt", "input_type": _EXT_TYPE[ext],
               "input_path": str(f), "prediction": "{}", "scores": "[]", "label": None,
               "source": "reimported", "msg_id": sid, "queued": now, "usefulness": 0.0,
               "nbytes": st.st_size, "heldout": 0, "shared": "none"}
        s = meta.get(sid)
        if s:
            row.update(created_at=s.get("created_at", st.st_mtime), app=s.get("app"),
                       version=s.get("version", ""), reason=s.get("reason", ""),
                       prediction=json.dumps(s.get("prediction") or {}),
                       scores=json.dumps(s.get("scores") or []), label=s.get("label"),
                       source=s.get("source"), usefulness=float(s.get("usefulness") or 0),
                       heldout=int(bool(s.get("heldout"))), shared=s.get("shared"))
            rep["from_outbox"] += 1
        else:
            rep["bare"] += 1
        row = {k: v for k, v in row.items() if k in cols}
        target.execute(f"INSERT OR IGNORE INTO samples ({', '.join(_q(k) for k in row)}) "
                       f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
        rep["reimported"] += 1
        if len(rep["ids"]) < 50:
            rep["ids"].append(sid)
    return rep


# -- the whole step ------------------------------------------------------------------
def build_restore(damaged: Path, copy: Path, out: Path, samples_dir: Path | None = None,
                  use_cli: bool = True) -> dict[str, Any]:
    """Write ``out``: the last good ``copy`` plus what ``damaged`` still gives, and
    the sample files re-imported. Returns the report: ``tables`` (per table),
    ``salvaged``/``lost`` totals, ``samples`` (re-import), ``error``."""
    t0 = time.monotonic()
    salv = salvage(damaged, use_cli=use_cli, copy=copy)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    shutil.copyfile(copy, tmp)
    conn = sqlite3.connect(str(tmp), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN")
        tables = merge(conn, salv)
        ob = salv["tables"].get(OUTBOX)
        lost_msgs = None
        if ob is not None and ob.cols:
            present = {r[0] for r in conn.execute(f"SELECT msg_id FROM {OUTBOX}")}
            if ob.lost_rowids is not None and "msg_id" in ob.key:
                lost_msgs = {k[0] for k in ob.lost_keys.values()} - present
            elif not ob.complete():  # lost ones unknown: every unqueued-looking sample
                lost_msgs = {r[0] for r in conn.execute(
                    "SELECT msg_id FROM samples WHERE queued IS NOT NULL")} - present \
                    if "samples" in salv["tables"] else None
        samples = reimport_samples(conn, samples_dir, lost_msgs)
        conn.execute("COMMIT")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    if not ok:
        tmp.unlink(missing_ok=True)
        raise sqlite3.DatabaseError("the merged database fails quick_check")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)
    salvaged = {k: v["inserted"] + v["updated"] for k, v in tables.items()
                if v.get("inserted") or v.get("updated")}
    lost = {k: v["lost"] for k, v in tables.items() if v.get("lost") != 0}
    return {"tables": tables, "salvaged": salvaged, "lost": lost, "samples": samples,
            "error": salv["error"], "cli_rows": salv["cli_rows"],
            "leaf_rows": salv.get("leaf_rows", {}),
            "schema_from_copy": salv.get("schema_from_copy", False),
            "cli": cli_recover_available() if use_cli else False,
            "seconds": round(time.monotonic() - t0, 3)}


def describe(rep: dict[str, Any]) -> str:
    """One line for the remedy: salvaged, lost, re-imported."""
    if rep.get("error") and not rep.get("tables"):
        return f"nothing salvaged from the damaged file ({rep['error']})"
    sv = ", ".join(f"{t} {n}" for t, n in sorted(rep["salvaged"].items())) or "none"
    lost = ", ".join(f"{t} {'?' if n is None else n}"
                     for t, n in sorted(rep["lost"].items())) or "none"
    s = rep["samples"]
    out = f"salvaged rows newer than the copy: {sv}; lost (unreadable): {lost}"
    if rep.get("schema_from_copy"):
        out += " (its schema was unreadable: read with the copy's)"
    if s.get("reimported") or s.get("requeued"):
        out += (f"; sample files re-imported: {s['reimported']} ({s['from_outbox']} with "
                f"their metadata from the outbox, {s['bare']} bare)"
                f"; samples to queue again: {s['requeued']}")
    return out
