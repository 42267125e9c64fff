"""The job side of the protocol, for Python jobs: arguments, SIGTERM, progress
lines and atomic checkpoints. Imports only the standard library and numpy, so
a job process stays light (it never loads the agent).

    ctx = JobContext.from_args(parser)       # --checkpoint-dir, --resume, SIGTERM
    state = ctx.load_latest() if ctx.resume else None
    ...
    ctx.save(step, {"w": w}, {"epoch": 3})   # tmp + fsync + rename + fsync dir
    ctx.emit("progress", step=step, total=n)
    if ctx.stop_requested: ctx.save(...); sys.exit(0)

A checkpoint is ``ckpt-<step>.npz`` holding the arrays plus a JSON ``__meta__``;
the newest that loads is the latest complete one (the last two are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
_META = "__meta__"


def save_checkpoint(directory: Path, step: int, arrays: dict[str, np.ndarray],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``ckpt-<step>.npz`` atomically; older ones beyond ``keep`` are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:010d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{_META: np.array(json.dumps(meta))})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in sorted(directory.glob("ckpt-*.npz"))[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_latest(directory: Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
    """(step, arrays, meta) of the newest checkpoint that loads, or None."""
    for path in sorted(directory.glob("ckpt-*.npz"), reverse=True):
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != _META}
                meta = json.loads(str(z[_META]))
            return int(path.stem.split("-")[1]), arrays, meta
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


class JobContext:
    """What a job needs from its runner: where to checkpoint, whether to resume,
    whether it has been asked to stop, and a way to report progress."""

    def __init__(self, checkpoint_dir: Path, resume: bool) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self._stop = threading.Event()
        self.cores = int(os.environ.get("AIDC_JOB_CORES", "0")) or (os.cpu_count() or 1)

    @classmethod
    def from_args(cls, parser: argparse.ArgumentParser,
                  argv: list[str] | None = None) -> tuple[JobContext, argparse.Namespace]:
        parser.add_argument("--checkpoint-dir", type=Path, required=True)
        parser.add_argument("--resume", action="store_true")
        args = parser.parse_args(argv)
        ctx = cls(args.checkpoint_dir, args.resume)
        ctx.install()
        return ctx, args

    def install(self) -> None:
        """SIGTERM sets :attr:`stop_requested`; so does the agent going away."""
        signal.signal(signal.SIGTERM, lambda signum, frame: self._stop.set())
        parent = os.environ.get("AIDC_JOB_PARENT_PID")
        if parent:
            threading.Thread(target=self._watch_parent, args=(int(parent),),
                             name="parent-watch", daemon=True).start()

    def _watch_parent(self, parent: int) -> None:
        while not self._stop.is_set():
            if os.getppid() != parent:
                logger.warning("the agent (pid %d) is gone; stopping", parent)
                self._stop.set()
            time.sleep(1.0)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON progress line on stdout (the runner reads it). A closed pipe means
        the runner is gone: stop (after the next checkpoint) rather than crash."""
        try:
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self._stop.set()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def save(self, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        path = save_checkpoint(self.checkpoint_dir, step, arrays, meta)
        self.emit("checkpoint", step=step, path=path.name)
        return path

    def load_latest(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
        return load_latest(self.checkpoint_dir)
