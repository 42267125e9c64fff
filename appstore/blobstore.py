"""Content-addressed files: ``<dir>/<sha256>[.<ext>]``.

Packages live in ``data_dir/blobs/<sha256>``, feedback inputs in
``data_dir/samples/<sha256>.<ext>``. A file is written to a temp name in the
same folder, fsynced and renamed, so a reader never sees half a file and the
same content is stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ContentStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str, ext: str = "") -> Path | None:
        """The file of ``sha256`` if we have it (a bad id is simply not found)."""
        if not SHA256_RE.match(sha256 or ""):
            return None
        p = self.root / (sha256 + (f".{ext}" if ext else ""))
        return p if p.is_file() else None

    def put_bytes(self, data: bytes, ext: str = "") -> tuple[str, Path]:
        sha = hashlib.sha256(data).hexdigest()
        target = self.root / (sha + (f".{ext}" if ext else ""))
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return sha, target

    def put_file(self, src: str | Path, sha256: str, ext: str = "") -> Path:
        """Move ``src`` (whose sha256 the caller has checked) into the store."""
        target = self.root / (sha256 + (f".{ext}" if ext else ""))
        if target.exists():
            os.unlink(src)
            return target
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.replace(src, target)
        except OSError:  # another filesystem: copy in, then rename
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            os.unlink(src)
        return target
