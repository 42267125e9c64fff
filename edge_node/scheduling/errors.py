"""Errors of the scheduling package, under the edge node's one root."""

from __future__ import annotations

from ..errors import EdgeError


class SchedulingError(EdgeError):
    """Root of what the scheduling package raises on purpose."""


class UnknownJob(SchedulingError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no training job {job_id!r}")


class JobStateError(SchedulingError):
    """A transition the job's state does not allow (e.g. retrying a done job)."""

    def __init__(self, job_id: str, state: str, wanted: str) -> None:
        self.job_id, self.state, self.wanted = job_id, state, wanted
        super().__init__(f"training job {job_id!r} is {state}; cannot become {wanted}")
