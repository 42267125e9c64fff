"""Replace a file in one rename: a reader sees the old file or the new one,
never half of one, even across a power loss (the data and the directory entry
are fsynced). Standard library only; the node and the AppStore both use it."""

from __future__ import annotations

import grp
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int | None = None,
                 group: str | None = None) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; ``mode``: the file's
    permissions (default: the temp file's, 0600); ``group``: its group (e.g. the
    broker's, so it can read a 0640 file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if group is not None:
            os.fchown(fd, -1, grp.getgrnam(group).gr_gid)
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
