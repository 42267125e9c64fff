"""The data plane's exceptions: one root, subclasses that carry fields."""

from __future__ import annotations


class WorkerException(Exception):
    """Root of every error raised by :mod:`edge_node.worker`."""


class BadInput(WorkerException, ValueError):
    """A request the model cannot take (wrong name, shape, dtype, unreadable image).

    Always the caller's fault: the worker answers it with status 400.
    """


class FrameUnavailable(WorkerException):
    """A camera frame named by reference (``classify_frame``) cannot be read.

    ``status`` 409: the capture process overwrote its shared-memory slot before
    the worker read it (a drop, counted by the stream); 410: the ring is gone
    or was replaced (the capture process stopped or restarted).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class ModelMismatch(WorkerException):
    """The manifest's declared tensors do not match the ONNX model's real ones."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("model does not match its manifest: " + "; ".join(problems))


class WorkerError(WorkerException):
    """The worker answered a request with an error (``status`` 400 or 500)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class WorkerUnavailable(WorkerException):
    """The worker cannot be reached (not running, restarting, socket gone, timed out)."""


class WorkerStartError(WorkerException):
    """A worker process did not come up; ``stderr_tail`` holds its last words."""

    def __init__(self, app_key: str, reason: str, stderr_tail: str = "") -> None:
        self.app_key = app_key
        self.reason = reason
        self.stderr_tail = stderr_tail
        msg = f"worker {app_key!r} failed to start: {reason}"
        if stderr_tail:
            msg += "\n--- worker stderr (tail) ---\n" + stderr_tail
        super().__init__(msg)
