"""The data plane: model worker processes and their client and supervisor.

Importing this package is cheap (no ONNX Runtime); the worker process itself
lives in :mod:`edge_node.worker.process`.
"""

from .errors import (
    BadInput,
    ModelMismatch,
    WorkerError,
    WorkerException,
    WorkerStartError,
    WorkerUnavailable,
)

__all__ = [
    "BadInput",
    "ModelMismatch",
    "WorkerError",
    "WorkerException",
    "WorkerStartError",
    "WorkerUnavailable",
]
