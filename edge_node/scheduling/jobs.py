"""The registry of training jobs and their durable states.

A job is any program run as a separate process under the scheduler. The job
protocol (also in docs/scheduling.md):

- **Start.** ``<argv> --checkpoint-dir DIR [--resume]`` with the working dir
  set to the job's own directory (``<jobs_dir>/<job_id>``, ``DIR`` is its
  ``checkpoints/``). ``--resume`` is passed on every start after the first.
  The environment carries ``AIDC_JOB_ID``, ``AIDC_JOB_CARD``,
  ``AIDC_JOB_FRACTION`` (the granted share of the card), ``AIDC_JOB_CORES``
  (how many threads to use), ``AIDC_JOB_CPUS`` (the cores it is pinned to,
  comma-separated; empty on a GPU), ``AIDC_JOB_CHECKPOINT_DIR``,
  ``AIDC_JOB_RESUME`` (``1``/``0``), ``AIDC_JOB_PARENT_PID``, and
  ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``.
- **Checkpoints.** Periodically and on SIGTERM, written atomically (tmp file,
  fsync, rename, fsync the dir) so a kill at any instant leaves the previous
  complete checkpoint. On ``--resume`` it continues from the latest complete
  one (or from zero if there is none).
- **SIGTERM.** Checkpoint, then exit 0 within the grace period
  (``scheduling.grace_s``); after it the process group is SIGKILLed.
- **Progress.** JSON lines on stdout: ``{"event": "progress", "step": 3,
  "total": 10, ...}``, ``{"event": "checkpoint", "step": 3}``, ``{"event":
  "done", ...}``; other lines are logged. stderr is logged; its last lines
  give the reason of a failure.
- **Exit.** 0 when done (or after SIGTERM, when preempted; a job asked to
  stop that still wants to say it finished prints ``{"event": "done"}``);
  anything else is a failure.

States, kept in the ``training_jobs`` table of the SQLite file given (this
package owns the table and its migrations, ``edge_node.scheduling``):
``queued`` -> ``running`` -> ``done`` | ``failed`` | ``preempted`` ->
``running`` ...; ``failed`` -> ``queued`` by :meth:`JobRegistry.retry`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlite_utils.migrations import Migrations

from .errors import JobStateError, UnknownJob
from cloud_sync.windows import CARD_RE

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "preempted", "done", "failed"]
_ALLOWED = {
    "queued": {"running", "failed"},
    "running": {"preempted", "done", "failed"},
    "preempted": {"running", "failed"},
    "failed": {"queued"},
    "done": set(),
}
migrations = Migrations("edge_node.scheduling")


@migrations()
def m001_training_jobs(db: sqlite_utils.Database) -> None:
    db["training_jobs"].create(
        {"job_id": str, "name": str, "spec": str, "card": str, "priority": int, "state": str,
         "reason": str, "created_at": float, "updated_at": float, "starts": int,
         "preemptions": int, "kills": int, "progress": str, "pid": int},
        pk="job_id", not_null={"name", "spec", "card", "state"},
    )
    db["training_jobs"].create_index(["state", "card"])


class JobSpec(BaseModel):
    """What to run: a Python module (``python -m``) or a command, plus where."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    module: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*$")
    command: list[str] | None = Field(default=None, min_length=1)
    args: list[str] = Field(default_factory=list)
    card: str = Field(default="cpu", pattern=CARD_RE)
    #: higher runs first; ties in submission order
    priority: int = 0
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_target(self) -> JobSpec:
        if (self.module is None) == (self.command is None):
            raise ValueError("give exactly one of 'module' (python -m) or 'command' (argv)")
        if self.card == "*":
            raise ValueError("a job runs on one card: name it (e.g. 'cpu'), not '*'")
        return self

    def argv(self, checkpoint_dir: Path, resume: bool) -> list[str]:
        base = [sys.executable, "-m", self.module] if self.module else list(self.command or [])
        return base + self.args + ["--checkpoint-dir", str(checkpoint_dir)] + \
            (["--resume"] if resume else [])


@dataclass
class JobRecord:
    job_id: str
    spec: JobSpec
    state: JobState
    job_dir: Path
    reason: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    starts: int = 0
    preemptions: int = 0
    kills: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "name": self.spec.name, "card": self.spec.card,
                "state": self.state, "reason": self.reason, "starts": self.starts,
                "preemptions": self.preemptions, "kills": self.kills,
                "progress": self.progress, "created_at": self.created_at,
                "updated_at": self.updated_at}


class JobRegistry:
    """Thread-safe access to the jobs table; one connection, one lock."""

    def __init__(self, db_path: Path, jobs_dir: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.jobs_dir = jobs_dir
        conn = sqlite3.connect(str(db_path), check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        with self._lock:
            migrations.apply(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.conn.close()

    def _row(self, r: dict) -> JobRecord:
        return JobRecord(
            job_id=r["job_id"], spec=JobSpec.model_validate_json(r["spec"]), state=r["state"],
            job_dir=self.jobs_dir / r["job_id"], reason=r["reason"], created_at=r["created_at"],
            updated_at=r["updated_at"], starts=r["starts"], preemptions=r["preemptions"],
            kills=r["kills"], progress=json.loads(r["progress"] or "{}"), pid=r["pid"])

    def submit(self, spec: JobSpec) -> JobRecord:
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        with self._lock, self._db.conn:
            self._db["training_jobs"].insert({
                "job_id": job_id, "name": spec.name, "spec": spec.model_dump_json(),
                "card": spec.card, "priority": spec.priority, "state": "queued", "reason": None,
                "created_at": now, "updated_at": now, "starts": 0, "preemptions": 0,
                "kills": 0, "progress": "{}", "pid": None})
        (self.jobs_dir / job_id / "checkpoints").mkdir(parents=True, exist_ok=True)
        logger.info("training job %s queued on card %s", job_id, spec.card)
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            rows = list(self._db["training_jobs"].rows_where("job_id = ?", [job_id]))
        if not rows:
            raise UnknownJob(job_id)
        return self._row(rows[0])

    def list(self, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        where = f"state IN ({','.join('?' * len(states))})" if states else None
        with self._lock:
            rows = list(self._db["training_jobs"].rows_where(
                where, list(states or ()), order_by="created_at"))
        return [self._row(r) for r in rows]

    def next_runnable(self, card_id: str) -> JobRecord | None:
        """The job to run next on the card: highest priority, then oldest."""
        with self._lock:
            rows = list(self._db["training_jobs"].rows_where(
                "card = ? AND state IN ('queued', 'preempted')", [card_id],
                order_by="priority DESC, created_at", limit=1))
        return self._row(rows[0]) if rows else None

    def cards_with_work(self) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT card FROM training_jobs WHERE state IN "
                "('queued', 'preempted', 'running')").fetchall()
        return {r[0] for r in rows}

    def transition(self, job_id: str, state: JobState, reason: str | None = None,
                   **counters: int) -> JobRecord:
        """Move a job to ``state``; ``counters`` (starts=1...) are added, ``pid`` set."""
        with self._lock:
            rec = self.get(job_id)
            if state not in _ALLOWED[rec.state]:
                raise JobStateError(job_id, rec.state, state)
            sets = {"state": state, "reason": reason, "updated_at": time.time(),
                    "pid": counters.pop("pid", None)}
            for k, inc in counters.items():
                sets[k] = getattr(rec, k) + inc
            with self._db.conn:
                self._db["training_jobs"].update(job_id, sets)
        logger.info("training job %s: %s -> %s%s", job_id, rec.state, state,
                    f" ({reason})" if reason else "")
        return self.get(job_id)

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._lock, self._db.conn:
            self._db["training_jobs"].update(
                job_id, {"progress": json.dumps(progress), "updated_at": time.time()})

    def retry(self, job_id: str) -> JobRecord:
        """A failed job back to the queue; it resumes from its last checkpoint."""
        return self.transition(job_id, "queued", "retried")
